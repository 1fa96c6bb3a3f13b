// CUDA sum-tree kernels for prioritized replay (the `cuda` backend of dlcore/rl/sum_tree.py's ops); same layout
// and results as the numba CPU kernels and kernels/sum_tree.py:
//   the binary sum-tree stored 8-ary (every third level): node j of level l at levels[l] + j, its 8 children at
//   levels[l + 1] + 8j (64 contiguous bytes), a node the pairwise sum ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)); root
//   at [0], leaves from levels[depth] (float64); min_tree alike.
//   sample: one thread per stratum; mass (b + offset_b)·total/B below the total, one 8-ary level per step taking
//           the three binary decisions from pair sums, never into an empty subtree; weight (p / p_min)^-β. offset_b
//           is given, or drawn in the kernel (Philox draw `counter` under `seed`, common/philox.h uniform53, the
//           numbers the CPU draws): the replay buffers' path, no offsets copied to the device.
//   sample_gather: the same descent (weights stored as float64 or float32), then each block copies its samples'
//           rows of every replay field ((src, dst, row_bytes) of up to 16 fields, kernel parameters): a warp per
//           row, 16-byte moves when addresses and row size allow.
//   update: one block; leaves first (duplicates resolved by the caller: the last write of each index is kept),
//           then the ancestors level by level with __syncthreads() between levels.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/philox.h"
#include "cuda/check.h"

namespace py = pybind11;

namespace {

constexpr int kSampleThreads = 256;
constexpr int kGatherThreads = 128;
constexpr int kUpdateThreads = 1024;

// One binary step: right when the mass lies at or past the left sum and the right subtree is not empty.
__device__ __forceinline__ bool pick(double& mass, double left, double right) {
  const bool go_right = mass >= left && right > 0.0;
  if (go_right) mass -= left;
  return go_right;
}

// Where the weights go: float64, or float32 (computed in float64, rounded once by the store).
struct Weights {
  void* out;
  bool f32;
  __device__ void store(int b, double w) const {
    if (f32)
      static_cast<float*>(out)[b] = float(w);
    else
      static_cast<double*>(out)[b] = w;
  }
};

// Stratum b's descent; stores its leaf index and weight and returns the leaf index.
__device__ int64_t descend(const double* __restrict__ tree, const double* __restrict__ min_tree,
                           const int64_t* __restrict__ levels, int depth, const dlcore::DrawOffsets& offsets,
                           int64_t* __restrict__ out_index, const Weights& out_weight, int b, int batch,
                           double beta) {
  const double total = tree[0];
  double mass = fmin((b + offsets.at(b)) * (total / batch), total * (1.0 - 0x1p-52));
  int64_t node = 0;
  for (int level = 1; level <= depth; ++level) {
    const double* c = tree + levels[level] + 8 * node;
    const double2 p01 = *reinterpret_cast<const double2*>(c), p23 = *reinterpret_cast<const double2*>(c + 2);
    const double2 p45 = *reinterpret_cast<const double2*>(c + 4), p67 = *reinterpret_cast<const double2*>(c + 6);
    const double s01 = p01.x + p01.y, s23 = p23.x + p23.y, s45 = p45.x + p45.y, s67 = p67.x + p67.y;
    const bool r1 = pick(mass, s01 + s23, s45 + s67);
    const bool r2 = pick(mass, r1 ? s45 : s01, r1 ? s67 : s23);
    const double2 pair = r1 ? (r2 ? p67 : p45) : (r2 ? p23 : p01);
    const bool r3 = pick(mass, pair.x, pair.y);
    node = 8 * node + 4 * r1 + 2 * r2 + r3;
  }
  out_index[b] = node;
  out_weight.store(b, pow(tree[levels[depth] + node] / min_tree[0], -beta));
  return node;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const double* __restrict__ tree, const double* __restrict__ min_tree,
                  const int64_t* __restrict__ levels, int depth, dlcore::DrawOffsets offsets,
                  int64_t* __restrict__ out_index, Weights out_weight, int batch, double beta) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < batch) descend(tree, min_tree, levels, depth, offsets, out_index, out_weight, b, batch, beta);
}

// The replay fields to gather, passed by value with the launch (kernel parameters: no table copied to the device
// per sample): field f is (src address, dst address, row bytes) at [3f, 3f + 3).
constexpr int kMaxFields = 16;
struct Fields {
  int n;
  int64_t entry[3 * kMaxFields];
};

__global__ void __launch_bounds__(kGatherThreads)
    sample_gather_kernel(const double* __restrict__ tree, const double* __restrict__ min_tree,
                         const int64_t* __restrict__ levels, int depth, dlcore::DrawOffsets offsets,
                         int64_t* __restrict__ out_index, Weights out_weight, const Fields fields, int batch,
                         double beta) {
  __shared__ int64_t rows[kGatherThreads];
  const int first = blockIdx.x * kGatherThreads;
  const int b = first + threadIdx.x;
  if (b < batch)
    rows[threadIdx.x] = descend(tree, min_tree, levels, depth, offsets, out_index, out_weight, b, batch, beta);
  __syncthreads();
  const int count = min(kGatherThreads, batch - first);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int f = 0; f < fields.n; ++f) {  // dst_f[b, :] = src_f[row_b, :]
    const char* src = reinterpret_cast<const char*>(fields.entry[3 * f]);
    char* dst = reinterpret_cast<char*>(fields.entry[3 * f + 1]);
    const int64_t row_bytes = fields.entry[3 * f + 2];
    for (int r = warp; r < count; r += kGatherThreads / 32) {
      const char* s = src + rows[r] * row_bytes;
      char* d = dst + int64_t(first + r) * row_bytes;
      if (((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) | uintptr_t(row_bytes)) & 15) == 0) {
        for (int64_t o = 16 * lane; o < row_bytes; o += 16 * 32)
          *reinterpret_cast<uint4*>(d + o) = *reinterpret_cast<const uint4*>(s + o);
      } else {
        for (int64_t o = lane; o < row_bytes; o += 32) d[o] = s[o];
      }
    }
  }
}

__global__ void __launch_bounds__(kUpdateThreads)
    update_kernel(double* __restrict__ tree, double* __restrict__ min_tree, const int64_t* __restrict__ levels,
                  int depth, const int64_t* __restrict__ index, const double* __restrict__ value, int n) {
  const int64_t leaf0 = levels[depth];
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    tree[leaf0 + index[k]] = value[k];
    min_tree[leaf0 + index[k]] = value[k] > 0.0 ? value[k] : INFINITY;  // a 0 leaf is never drawn
  }
  __syncthreads();
  for (int up = 1; up <= depth; ++up) {  // level depth - up from its 8 children; threads sharing a node agree
    const int64_t base = levels[depth - up], children = levels[depth - up + 1];
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
      const int64_t node = index[k] >> (3 * up);
      const double* t = tree + children + 8 * node;
      const double* m = min_tree + children + 8 * node;
      tree[base + node] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));  // the binary order
      min_tree[base + node] = fmin(fmin(fmin(m[0], m[1]), fmin(m[2], m[3])), fmin(fmin(m[4], m[5]), fmin(m[6], m[7])));
    }
    __syncthreads();
  }
}

// offsets 0: drawn in the kernel from Philox (seed, counter)
void sum_tree_sample(int64_t tree, int64_t min_tree, int64_t levels, int64_t depth, int64_t offsets, int64_t out_index,
                     int64_t out_weight, int64_t batch, double beta, long long stream, uint64_t seed,
                     uint64_t counter) {
  if (batch <= 0) return;
  if (batch > 0x7FFFFFFF) throw std::invalid_argument("dlcore: batch too large for one launch");
  const unsigned blocks = unsigned((batch + kSampleThreads - 1) / kSampleThreads);
  sample_kernel<<<blocks, kSampleThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const double*>(tree), reinterpret_cast<const double*>(min_tree),
      reinterpret_cast<const int64_t*>(levels), int(depth),
      dlcore::DrawOffsets{reinterpret_cast<const double*>(offsets), seed, counter},
      reinterpret_cast<int64_t*>(out_index),
      Weights{reinterpret_cast<void*>(out_weight), false}, int(batch), beta);
  DL_CUDA_CHECK_LAUNCH();
}

void sum_tree_sample_gather(int64_t tree, int64_t min_tree, int64_t levels, int64_t depth, int64_t offsets,
                            int64_t out_index, int64_t out_weight, bool weight_f32, const std::vector<int64_t>& srcs,
                            const std::vector<int64_t>& dsts, const std::vector<int64_t>& row_bytes, int64_t batch,
                            double beta, long long stream, uint64_t seed, uint64_t counter) {
  if (srcs.size() > size_t(kMaxFields) || dsts.size() != srcs.size() || row_bytes.size() != srcs.size())
    throw std::invalid_argument("dlcore: sum_tree_sample_gather takes at most 16 fields, one dst and row size each");
  Fields fields{int(srcs.size()), {}};
  for (size_t f = 0; f < srcs.size(); ++f) {
    fields.entry[3 * f] = srcs[f];
    fields.entry[3 * f + 1] = dsts[f];
    fields.entry[3 * f + 2] = row_bytes[f];
  }
  if (batch <= 0) return;
  if (batch > 0x7FFFFFFF) throw std::invalid_argument("dlcore: batch too large for one launch");
  const unsigned blocks = unsigned((batch + kGatherThreads - 1) / kGatherThreads);
  sample_gather_kernel<<<blocks, kGatherThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const double*>(tree), reinterpret_cast<const double*>(min_tree),
      reinterpret_cast<const int64_t*>(levels), int(depth),
      dlcore::DrawOffsets{reinterpret_cast<const double*>(offsets), seed, counter},
      reinterpret_cast<int64_t*>(out_index),
      Weights{reinterpret_cast<void*>(out_weight), weight_f32}, fields, int(batch), beta);
  DL_CUDA_CHECK_LAUNCH();
}

void sum_tree_update(int64_t tree, int64_t min_tree, int64_t levels, int64_t depth, int64_t index, int64_t value,
                     int64_t n, long long stream) {
  if (n <= 0) return;
  if (n > 0x7FFFFFFF) throw std::invalid_argument("dlcore: too many updates for one launch");
  update_kernel<<<1, kUpdateThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<double*>(tree), reinterpret_cast<double*>(min_tree), reinterpret_cast<const int64_t*>(levels),
      int(depth), reinterpret_cast<const int64_t*>(index), reinterpret_cast<const double*>(value), int(n));
  DL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void register_sum_tree(py::module_& m) {
  m.def("sum_tree_sample", &sum_tree_sample,
        "Stratified sum-tree descents (device addresses, stream as integer; offsets 0: Philox (seed, counter))",
        py::arg("tree"), py::arg("min_tree"), py::arg("levels"), py::arg("depth"), py::arg("offsets"),
        py::arg("out_index"), py::arg("out_weight"), py::arg("batch"), py::arg("beta"), py::arg("stream"),
        py::arg("seed") = 0, py::arg("counter") = 0);
  m.def("sum_tree_sample_gather", &sum_tree_sample_gather,
        "Stratified descents, then the sampled rows of every field (at most 16: addresses and row sizes in bytes, "
        "passed with the launch) (offsets 0: Philox (seed, counter))",
        py::arg("tree"), py::arg("min_tree"), py::arg("levels"), py::arg("depth"), py::arg("offsets"),
        py::arg("out_index"), py::arg("out_weight"), py::arg("weight_f32"), py::arg("srcs"), py::arg("dsts"),
        py::arg("row_bytes"), py::arg("batch"), py::arg("beta"), py::arg("stream"), py::arg("seed") = 0,
        py::arg("counter") = 0);
  m.def("sum_tree_update", &sum_tree_update, "Write leaves, then recompute their ancestors (one block)",
        py::arg("tree"), py::arg("min_tree"), py::arg("levels"), py::arg("depth"), py::arg("index"), py::arg("value"),
        py::arg("n"), py::arg("stream"));
}
