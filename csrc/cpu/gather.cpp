// Row gather for replay buffers (the `cpu` backend of dlcore/rl/gather.py's gather_rows op):
//   for every field f and row b: dst_f[b, :] = src_f[index[b], :]   (rows of row_bytes_f bytes)
// One call gathers every field of a sampled batch. The rows are random in memory (a 1M-transition buffer does not
// fit in cache), so the loop prefetches the rows kPrefetchAhead iterations ahead: the misses then overlap instead of
// being waited for one at a time. Large batches (Atari frames: 7 KB a row) split the rows over OpenMP threads.
// Also here: frame_stack_sample's cpu backend, which plans which frames a stacked-frame sample reads and copies them.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kPrefetchAhead = 8;
constexpr int64_t kParallelBytes = 1 << 20;  // below this, thread start-up costs more than it saves
constexpr int64_t kWholeRowBytes = 1024, kWholeRowAhead = 3;

inline void prefetch_row(const char* row, int64_t bytes) {
  for (int64_t o = 0; o < bytes && o < 256; o += 64) __builtin_prefetch(row + o, 0, 0);
}

struct Bytes16 {
  uint64_t lo, hi;
};

template <typename Row>
void copy_rows(const char* src, char* dst, const int64_t* index, int64_t n) {
  const auto* s = reinterpret_cast<const Row*>(src);
  auto* d = reinterpret_cast<Row*>(dst);
  for (int64_t b = 0; b < n; ++b) {
    if (b + kPrefetchAhead < n) __builtin_prefetch(s + index[b + kPrefetchAhead], 0, 0);
    d[b] = s[index[b]];
  }
}

// dst[b] = src[index[b]] for rows of rb bytes (Atari frames: 7 KB); index −1 writes a row of zeros. Over OpenMP
// threads when `parallel`. Rows of a kilobyte or more are prefetched whole, kWholeRowAhead rows ahead, into L2
// (prefetcht2): the hardware streamer starts only after a row's first lines have missed. 256 random 7 KB rows of
// 1.4 GB on 2 threads (AMD EPYC VM, huge pages): 117-137 us with the first 256 bytes 8 rows ahead, 105-110 whole.
void copy_large_rows(const char* src, char* dst, const int64_t* index, int64_t n, int64_t rb, bool parallel) {
  const bool whole = rb >= kWholeRowBytes;
  const int64_t ahead = whole ? kWholeRowAhead : kPrefetchAhead;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t b = 0; b < n; ++b) {
    if (b + ahead < n && index[b + ahead] >= 0) {
      const char* row = src + index[b + ahead] * rb;
      if (whole)
        for (int64_t o = 0; o < rb; o += 64) __builtin_prefetch(row + o, 0, 1);
      else
        prefetch_row(row, rb);
    }
    if (index[b] >= 0)
      std::memcpy(dst + b * rb, src + index[b] * rb, size_t(rb));
    else
      std::memset(dst + b * rb, 0, size_t(rb));
  }
}

// The `cpu` backend of frame_stack_sample (dlcore/rl/frames.py has the storage layout and the math): for every
// drawn slot t the plan (the n-step return over m = min(n, steps to the episode end) steps, and the slots of the
// obs stack ending at t and the next_obs stack ending at t + m, padded before the episode's first frame), then the
// frames, in one call: the plan of 32 samples is about a microsecond of work, less than a numba or torch call
// costs to start. Every slot index is taken modulo the capacity (the storage is a ring). The float64 sums match
// the reference's to rounding. Returns 0, or 1 when an index is outside [0, cap) (nothing is written then).
int frame_stack_sample(int64_t frames, int64_t frame_bytes, int64_t ended_addr, int64_t reward_addr,
                       int64_t terminated_addr, int64_t start_addr, int64_t cap, int64_t index_addr, int64_t batch,
                       int stack, int n_step, double gamma, bool zero_pad, int64_t out, int64_t ret_addr,
                       int64_t term_addr, int64_t discount_addr) {
  const auto* index = reinterpret_cast<const int64_t*>(index_addr);
  for (int64_t b = 0; b < batch; ++b)
    if (index[b] < 0 || index[b] >= cap) return 1;
  const auto* ended = reinterpret_cast<const bool*>(ended_addr);
  const auto* reward = reinterpret_cast<const float*>(reward_addr);
  const auto* terminated = reinterpret_cast<const bool*>(terminated_addr);
  const auto* episode_start = reinterpret_cast<const int64_t*>(start_addr);
  auto* ret = reinterpret_cast<float*>(ret_addr);
  auto* term = reinterpret_cast<float*>(term_addr);
  auto* discount = reinterpret_cast<float*>(discount_addr);
  const auto ring = [cap](int64_t x) { return (x % cap + cap) % cap; };
  // the per-slot fields of 32 random slots are as many cache (and TLB) misses: start them all before the plan's
  // loop waits on them one sample at a time (6.4 -> 4.7 us for the plan of 32 samples, AMD EPYC VM)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t t = index[b];
    __builtin_prefetch(ended + t);
    __builtin_prefetch(reward + t);
    __builtin_prefetch(terminated + t);
    __builtin_prefetch(episode_start + t);
    __builtin_prefetch(episode_start + std::min(t + n_step, cap - 1));  // the next_obs slot's, mostly
  }
  std::vector<int64_t> rows(size_t(2 * batch * stack));  // [2][batch][stack] source slots, −1 for zero padding
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t t = index[b];
    double total = 0.0, scale = 1.0;  // Σ_{k<m} γᵏ r[t+k], and γᵐ
    int m = 0;
    for (int k = 0; k < n_step; ++k) {
      const int64_t s = ring(t + k);
      total += scale * double(reward[s]);
      scale *= gamma;
      ++m;
      if (ended[s]) break;
    }
    ret[b] = float(total);
    term[b] = terminated[ring(t + m - 1)] ? 1.0f : 0.0f;
    discount[b] = float(scale);
    for (int half = 0; half < 2; ++half) {
      const int64_t slot = half == 0 ? t : ring(t + m);
      const int64_t since = ring(slot - episode_start[slot]);  // frames of the episode before this one
      for (int j = 0; j < stack; ++j) {
        const int64_t back = stack - 1 - j;
        rows[size_t((half * batch + b) * stack + j)] =
            back > since && zero_pad ? -1 : ring(slot - std::min(back, since));
      }
    }
  }
  const int64_t n = 2 * batch * stack;
  copy_large_rows(reinterpret_cast<const char*>(frames), reinterpret_cast<char*>(out), rows.data(), n, frame_bytes,
                  n * frame_bytes >= kParallelBytes);
  return 0;
}

}  // namespace

namespace dlcore {
// Returns 0, or 1 when an index is outside [0, limit) (nothing is written then).
int gather_rows(const std::vector<int64_t>& srcs, const std::vector<int64_t>& dsts,
                const std::vector<int64_t>& row_bytes, int64_t index_addr, int64_t n, int64_t limit) {
  const auto* index = reinterpret_cast<const int64_t*>(index_addr);
  for (int64_t b = 0; b < n; ++b)
    if (index[b] < 0 || index[b] >= limit) return 1;
  int64_t total = 0;
  for (auto rb : row_bytes) total += rb * n;
  for (size_t f = 0; f < srcs.size(); ++f) {  // field by field: the row size is fixed inside the loop
    const char* src = reinterpret_cast<const char*>(srcs[f]);
    char* dst = reinterpret_cast<char*>(dsts[f]);
    const int64_t rb = row_bytes[f];
    switch (rb) {  // small rows (scalars, 4-float observations): a typed move instead of a memcpy call
      case 1: copy_rows<uint8_t>(src, dst, index, n); break;
      case 2: copy_rows<uint16_t>(src, dst, index, n); break;
      case 4: copy_rows<uint32_t>(src, dst, index, n); break;
      case 8: copy_rows<uint64_t>(src, dst, index, n); break;
      case 16: copy_rows<Bytes16>(src, dst, index, n); break;
      default: copy_large_rows(src, dst, index, n, rb, total >= kParallelBytes);
    }
  }
  return 0;
}
}  // namespace dlcore

void register_gather(py::module_& m) {
  m.def("gather_rows", &dlcore::gather_rows,
        "dst_f[b] = src_f[index[b]] for every field f (addresses and row sizes in bytes); 1 if an index is out of "
        "[0, limit)",
        py::arg("srcs"), py::arg("dsts"), py::arg("row_bytes"), py::arg("index"), py::arg("n"), py::arg("limit"));
  m.def("frame_stack_sample", &frame_stack_sample,
        "Stacked frames, n-step returns, terminated and discounts of the drawn slots (see dlcore/rl/frames.py); "
        "out [2, batch, stack, frame]; 1 if an index is out of [0, cap)",
        py::arg("frames"), py::arg("frame_bytes"), py::arg("ended"), py::arg("reward"), py::arg("terminated"),
        py::arg("episode_start"), py::arg("cap"), py::arg("index"), py::arg("batch"), py::arg("stack"),
        py::arg("n_step"), py::arg("gamma"), py::arg("zero_pad"), py::arg("out"), py::arg("ret"), py::arg("term"),
        py::arg("discount"));
}
