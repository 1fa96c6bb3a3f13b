// Row gather for replay buffers (the `cpu` backend of dlcore/rl/gather.py's gather_rows op):
//   for every field f and row b: dst_f[b, :] = src_f[index[b], :]   (rows of row_bytes_f bytes)
// One call gathers every field of a sampled batch. The rows are random in memory (a 1M-transition buffer does not
// fit in cache), so the loop prefetches the rows kPrefetchAhead iterations ahead: the misses then overlap instead of
// being waited for one at a time. Large batches (Atari frames: 28 KB a row) split the rows over OpenMP threads.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kPrefetchAhead = 8;
constexpr int64_t kParallelBytes = 1 << 20;  // below this, thread start-up costs more than it saves

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
      default:
#pragma omp parallel for schedule(static) if (total >= kParallelBytes)
        for (int64_t b = 0; b < n; ++b) {
          if (b + kPrefetchAhead < n) prefetch_row(src + index[b + kPrefetchAhead] * rb, rb);
          std::memcpy(dst + b * rb, src + index[b] * rb, size_t(rb));
        }
    }
  }
  return 0;
}

}  // namespace

void register_gather(py::module_& m) {
  m.def("gather_rows", &gather_rows,
        "dst_f[b] = src_f[index[b]] for every field f (addresses and row sizes in bytes); 1 if an index is out of "
        "[0, limit)",
        py::arg("srcs"), py::arg("dsts"), py::arg("row_bytes"), py::arg("index"), py::arg("n"), py::arg("limit"));
}
