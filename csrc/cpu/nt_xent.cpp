// The CPU twin of dlcore's fused NT-Xent loss (dlcore/ops/nt_xent.py) on L2-normalised embeddings u [M, d]
// (M = 2N views; the positive of row i is row (i + N) mod M), fp32. The M×M similarity matrix is never stored:
// rows are processed in blocks of kRowBlock against every column, the similarities of a block living in a
// per-thread scratch of kRowBlock × M floats.
//   forward:  s_ij = u_i·u_j/τ;  lse_i = log Σ_{j≠i} exp(s_ij);  pos_i = s_{i,p(i)}
//   backward: du_i = g/(Mτ)·( Σ_{j≠i} (exp(s_ij − lse_i) + exp(s_ij − lse_j))·u_j − 2·u_{p(i)} )
//             (row i's softmax, and row j's softmax at column i: s is symmetric, so each row block needs only its
//             own similarities)
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/vec_math.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

constexpr int kRowBlock = 8;

// C[r, n] = scale·Σ_k A[r, k]·B[k, n] for r < kRowBlock, n < n_cols (A: kRowBlock rows of stride lda; B, C
// row-major with strides ldb, ldc): an outer-product micro-kernel, kRowBlock × 32 accumulators in registers, one
// broadcast of A and two vector loads of B per k.
void gemm_rows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth,
               int64_t n_cols, float scale) {
  int64_t n = 0;
  for (; n + 2 * VW <= n_cols; n += 2 * VW) {
    vf acc[kRowBlock][2] = {};
    for (int64_t k = 0; k < depth; ++k) {
      vf b0, b1;
      std::memcpy(&b0, b + k * ldb + n, sizeof(vf));
      std::memcpy(&b1, b + k * ldb + n + VW, sizeof(vf));
      for (int r = 0; r < kRowBlock; ++r) {
        const float ar = a[r * lda + k];
        acc[r][0] += ar * b0;
        acc[r][1] += ar * b1;
      }
    }
    for (int r = 0; r < kRowBlock; ++r) {
      acc[r][0] *= scale;
      acc[r][1] *= scale;
      std::memcpy(c + r * ldc + n, &acc[r][0], sizeof(vf));
      std::memcpy(c + r * ldc + n + VW, &acc[r][1], sizeof(vf));
    }
  }
  for (; n < n_cols; ++n)
    for (int r = 0; r < kRowBlock; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < depth; ++k) acc += a[r * lda + k] * b[k * ldb + n];
      c[r * ldc + n] = acc * scale;
    }
}

// The row block [i0, i0 + rows) of u, zero-padded to kRowBlock rows (so the micro-kernel has no row tail).
const float* row_block(const float* u, int64_t i0, int64_t rows, int64_t d, std::vector<float>& pad) {
  if (rows == kRowBlock) return u + i0 * d;
  pad.assign(static_cast<size_t>(kRowBlock * d), 0.f);
  std::memcpy(pad.data(), u + i0 * d, sizeof(float) * size_t(rows * d));
  return pad.data();
}

// uᵀ [d, m], so that a row block's similarities are one outer-product GEMM against it.
std::vector<float> transposed(const float* u, int64_t m, int64_t d) {
  std::vector<float> t(static_cast<size_t>(m * d));
#pragma omp parallel for
  for (int64_t k = 0; k < d; ++k)
    for (int64_t j = 0; j < m; ++j) t[size_t(k * m + j)] = u[j * d + k];
  return t;
}

void forward(int64_t u_addr, int64_t lse_addr, int64_t pos_addr, int64_t m, int64_t d, float inv_tau) {
  const float* u = reinterpret_cast<const float*>(u_addr);
  float* lse = reinterpret_cast<float*>(lse_addr);
  float* pos = reinterpret_cast<float*>(pos_addr);
  const int64_t half = m / 2, blocks = (m + kRowBlock - 1) / kRowBlock;
  const std::vector<float> ut = transposed(u, m, d);
#pragma omp parallel
  {
    std::vector<float> scratch(static_cast<size_t>(kRowBlock * m)), pad;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kRowBlock, rows = std::min<int64_t>(kRowBlock, m - i0);
      gemm_rows(row_block(u, i0, rows, d, pad), d, ut.data(), m, scratch.data(), m, d, m, inv_tau);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* s = scratch.data() + r * m;
        pos[i] = s[(i + half) % m];
        s[i] = -INFINITY;  // j ≠ i
        float mx = -INFINITY;
        for (int64_t j = 0; j < m; ++j) mx = std::max(mx, s[j]);
        const int64_t nv = m / VW;
        vf acc = {};
        for (int64_t v = 0; v < nv; ++v) {
          vf x;
          std::memcpy(&x, s + v * VW, sizeof(vf));
          acc += expv_neg(x - mx);
        }
        float sum = sum_lanes(acc);
        for (int64_t j = nv * VW; j < m; ++j) sum += std::exp(s[j] - mx);
        lse[i] = mx + std::log(sum);
      }
    }
  }
}

void backward(int64_t u_addr, int64_t lse_addr, int64_t du_addr, int64_t m, int64_t d, float inv_tau, float scale) {
  const float* u = reinterpret_cast<const float*>(u_addr);
  const float* lse = reinterpret_cast<const float*>(lse_addr);
  float* du = reinterpret_cast<float*>(du_addr);
  const int64_t half = m / 2, blocks = (m + kRowBlock - 1) / kRowBlock;
  const std::vector<float> ut = transposed(u, m, d);
#pragma omp parallel
  {
    std::vector<float> w(static_cast<size_t>(kRowBlock * m)), out(static_cast<size_t>(kRowBlock * d)), pad;
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kRowBlock, rows = std::min<int64_t>(kRowBlock, m - i0);
      gemm_rows(row_block(u, i0, rows, d, pad), d, ut.data(), m, w.data(), m, d, m, inv_tau);
      for (int64_t r = 0; r < kRowBlock; ++r) {  // similarities → weights of u_j in du_i (padding rows: 0)
        const int64_t i = i0 + r;
        float* wr = w.data() + r * m;
        if (r >= rows) {
          std::fill(wr, wr + m, 0.f);
          continue;
        }
        // both exponents are ≤ 0 off the diagonal (lse_i ≥ s_ij for j ≠ i); the diagonal is overwritten below
        const int64_t nv = m / VW;
        for (int64_t v = 0; v < nv; ++v) {
          vf x, lj;
          std::memcpy(&x, wr + v * VW, sizeof(vf));
          std::memcpy(&lj, lse + v * VW, sizeof(vf));
          const vf y = expv_neg(vmin(x - lse[i], vf{})) + expv_neg(vmin(x - lj, vf{}));
          std::memcpy(wr + v * VW, &y, sizeof(vf));
        }
        for (int64_t j = nv * VW; j < m; ++j) wr[j] = std::exp(wr[j] - lse[i]) + std::exp(wr[j] - lse[j]);
        wr[i] = 0.f;
        wr[(i + half) % m] -= 2.f;
      }
      gemm_rows(w.data(), m, u, d, out.data(), d, m, d, scale);
      std::memcpy(du + i0 * d, out.data(), sizeof(float) * size_t(rows * d));
    }
  }
}

}  // namespace

void register_nt_xent(py::module_& m) {
  m.def("nt_xent_forward", &forward, "lse[i] = log sum_{j != i} exp(u_i.u_j/tau), pos[i] = u_i.u_{(i+M/2)%M}/tau",
        py::arg("u"), py::arg("lse"), py::arg("pos"), py::arg("rows"), py::arg("dim"), py::arg("inv_tau"),
        py::call_guard<py::gil_scoped_release>());
  m.def("nt_xent_backward", &backward,
        "du_i = scale * (sum_{j != i} (exp(s_ij - lse_i) + exp(s_ij - lse_j)) u_j - 2 u_{p(i)})", py::arg("u"),
        py::arg("lse"), py::arg("du"), py::arg("rows"), py::arg("dim"), py::arg("inv_tau"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
}
