// CUDA sum-tree kernels for prioritized replay (the `cuda` backend of dlcore/rl/sum_tree.py's ops); same layout
// and results as the numba CPU kernels and kernels/sum_tree.py:
//   tree[1] root, children of k at 2k and 2k+1, leaf i at size + i (float64); min_tree alike.
//   sample: one thread per stratum; mass (b + offset_b)·total/B below the total, descent level by level, never
//           into an empty subtree; weight (p / p_min)^-β.
//   sample_gather: the same descent, then each block copies its samples' rows of every replay field (a table of
//           (src, dst, row_bytes) addresses): a warp per row, 16-byte moves when addresses and row size allow.
//   update: one block; leaves first (duplicates resolved by the caller: the last write of each index is kept),
//           then the ancestors level by level with __syncthreads() between levels.
#include <pybind11/pybind11.h>

#include <cmath>

#include "cuda/check.h"

namespace py = pybind11;

namespace {

constexpr int kSampleThreads = 256;
constexpr int kGatherThreads = 128;
constexpr int kUpdateThreads = 1024;

// Stratum b's descent; stores its leaf index and weight and returns the leaf index.
__device__ int64_t descend(const double* __restrict__ tree, const double* __restrict__ min_tree,
                           const double* __restrict__ offsets, int64_t* __restrict__ out_index,
                           double* __restrict__ out_weight, int b, int batch, int64_t size, double beta) {
  const double total = tree[1];
  double mass = fmin((b + offsets[b]) * (total / batch), total * (1.0 - 0x1p-52));
  int64_t node = 1;
  while (node < size) {
    const int64_t left = 2 * node;
    const double left_sum = tree[left];
    if (mass < left_sum || tree[left + 1] <= 0.0) {
      node = left;
    } else {
      mass -= left_sum;
      node = left + 1;
    }
  }
  out_index[b] = node - size;
  out_weight[b] = pow(tree[node] / min_tree[1], -beta);
  return node - size;
}

__global__ void __launch_bounds__(kSampleThreads)
    sample_kernel(const double* __restrict__ tree, const double* __restrict__ min_tree,
                  const double* __restrict__ offsets, int64_t* __restrict__ out_index, double* __restrict__ out_weight,
                  int batch, int64_t size, double beta) {
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b < batch) descend(tree, min_tree, offsets, out_index, out_weight, b, batch, size, beta);
}

__global__ void __launch_bounds__(kGatherThreads)
    sample_gather_kernel(const double* __restrict__ tree, const double* __restrict__ min_tree,
                         const double* __restrict__ offsets, int64_t* __restrict__ out_index,
                         double* __restrict__ out_weight, const int64_t* __restrict__ table, int n_fields, int batch,
                         int64_t size, double beta) {
  __shared__ int64_t rows[kGatherThreads];
  const int first = blockIdx.x * kGatherThreads;
  const int b = first + threadIdx.x;
  if (b < batch) rows[threadIdx.x] = descend(tree, min_tree, offsets, out_index, out_weight, b, batch, size, beta);
  __syncthreads();
  const int count = min(kGatherThreads, batch - first);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int f = 0; f < n_fields; ++f) {  // dst_f[b, :] = src_f[row_b, :]
    const char* src = reinterpret_cast<const char*>(table[3 * f]);
    char* dst = reinterpret_cast<char*>(table[3 * f + 1]);
    const int64_t row_bytes = table[3 * f + 2];
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
    update_kernel(double* __restrict__ tree, double* __restrict__ min_tree, const int64_t* __restrict__ index,
                  const double* __restrict__ value, int n, int64_t size) {
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    tree[size + index[k]] = value[k];
    min_tree[size + index[k]] = value[k] > 0.0 ? value[k] : INFINITY;  // a 0 leaf is never drawn
  }
  __syncthreads();
  for (int shift = 1; (size >> shift) >= 1; ++shift) {  // one tree level per pass
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
      const int64_t node = (size + index[k]) >> shift;
      tree[node] = tree[2 * node] + tree[2 * node + 1];
      min_tree[node] = fmin(min_tree[2 * node], min_tree[2 * node + 1]);
    }
    __syncthreads();
  }
}

void sum_tree_sample(int64_t tree, int64_t min_tree, int64_t offsets, int64_t out_index, int64_t out_weight,
                     int64_t batch, int64_t size, double beta, long long stream) {
  if (batch <= 0) return;
  if (batch > 0x7FFFFFFF) throw std::invalid_argument("dlcore: batch too large for one launch");
  const unsigned blocks = unsigned((batch + kSampleThreads - 1) / kSampleThreads);
  sample_kernel<<<blocks, kSampleThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const double*>(tree), reinterpret_cast<const double*>(min_tree),
      reinterpret_cast<const double*>(offsets), reinterpret_cast<int64_t*>(out_index),
      reinterpret_cast<double*>(out_weight), int(batch), size, beta);
  DL_CUDA_CHECK_LAUNCH();
}

void sum_tree_sample_gather(int64_t tree, int64_t min_tree, int64_t offsets, int64_t out_index, int64_t out_weight,
                            int64_t table, int64_t n_fields, int64_t batch, int64_t size, double beta,
                            long long stream) {
  if (batch <= 0) return;
  if (batch > 0x7FFFFFFF) throw std::invalid_argument("dlcore: batch too large for one launch");
  const unsigned blocks = unsigned((batch + kGatherThreads - 1) / kGatherThreads);
  sample_gather_kernel<<<blocks, kGatherThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const double*>(tree), reinterpret_cast<const double*>(min_tree),
      reinterpret_cast<const double*>(offsets), reinterpret_cast<int64_t*>(out_index),
      reinterpret_cast<double*>(out_weight), reinterpret_cast<const int64_t*>(table), int(n_fields), int(batch),
      size, beta);
  DL_CUDA_CHECK_LAUNCH();
}

void sum_tree_update(int64_t tree, int64_t min_tree, int64_t index, int64_t value, int64_t n, int64_t size,
                     long long stream) {
  if (n <= 0) return;
  if (n > 0x7FFFFFFF) throw std::invalid_argument("dlcore: too many updates for one launch");
  update_kernel<<<1, kUpdateThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<double*>(tree), reinterpret_cast<double*>(min_tree), reinterpret_cast<const int64_t*>(index),
      reinterpret_cast<const double*>(value), int(n), size);
  DL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void register_sum_tree(py::module_& m) {
  m.def("sum_tree_sample", &sum_tree_sample, "Stratified sum-tree descents (device addresses, stream as integer)",
        py::arg("tree"), py::arg("min_tree"), py::arg("offsets"), py::arg("out_index"), py::arg("out_weight"),
        py::arg("batch"), py::arg("size"), py::arg("beta"), py::arg("stream"));
  m.def("sum_tree_sample_gather", &sum_tree_sample_gather,
        "Stratified descents, then the sampled rows of every field in a (src, dst, row_bytes) table",
        py::arg("tree"), py::arg("min_tree"), py::arg("offsets"), py::arg("out_index"), py::arg("out_weight"),
        py::arg("table"), py::arg("n_fields"), py::arg("batch"), py::arg("size"), py::arg("beta"),
        py::arg("stream"));
  m.def("sum_tree_update", &sum_tree_update, "Write leaves, then recompute their ancestors (one block)",
        py::arg("tree"), py::arg("min_tree"), py::arg("index"), py::arg("value"), py::arg("n"), py::arg("size"),
        py::arg("stream"));
}
