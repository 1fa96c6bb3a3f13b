// The CPU twin of dlcore's fused (residual add +) LayerNorm (dlcore/ops/layer_norm.py), rows × cols, OpenMP over
// rows, fp32 math on fp32/bf16/fp16 storage; weight and bias are fp32 (the launcher converts them).
//   forward:  h = x + r (stored when there is a residual, rounded to the storage type first, as torch would),
//             μ = mean(h), σ² = mean((h − μ)²) (two passes over an L1-resident row: no cancellation),
//             ρ = 1/√(σ² + ε), y = (h − μ)·ρ·w + b;   saves μ, ρ per row.
//   backward: ĥ = (h − μ)·ρ, g = dy·w;  dh = ρ·(g − mean(g) − ĥ·mean(g·ĥ)) + dh_direct (the gradient reaching h
//             through the residual stream);  dw = Σ_rows dy·ĥ,  db = Σ_rows dy (per-thread partials, thread order).
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/rows.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

template <int DT>
void forward(const void* x_, const void* r_, const float* w, const float* b, void* y_, void* h_, float* mean,
             float* rstd, int64_t rows, int64_t cols, float eps) {
  using St = Storage<DT>;
  using T = typename St::T;
  const T* x = static_cast<const T*>(x_);
  const T* r = static_cast<const T*>(r_);
  T* y = static_cast<T*>(y_);
  T* h = static_cast<T*>(h_);
  // absent weight / bias as ones / zeros, so that the loops below have no per-element branch
  std::vector<float> ones_zeros;
  if (!w || !b) {
    ones_zeros.assign(size_t(2 * cols), 0.f);
    std::fill(ones_zeros.begin(), ones_zeros.begin() + cols, 1.f);
    if (!w) w = ones_zeros.data();
    if (!b) b = ones_zeros.data() + cols;
  }
  const int64_t nv = vectors_for(cols);
#pragma omp parallel
  {
    std::vector<vf> store(static_cast<size_t>(nv)), centred(static_cast<size_t>(nv));
    float* v = reinterpret_cast<float*>(store.data());
    float* d = reinterpret_cast<float*>(centred.data());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const T* xi = x + i * cols;
      if (r) {
        const T* ri = r + i * cols;
        T* hi = h + i * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const T s = St::store(St::load(xi[c]) + St::load(ri[c]));
          hi[c] = s;
          v[c] = St::load(s);
        }
      } else {
        // "+ 0.0f" is not an identity for −0, so GCC keeps this a vector loop instead of turning an fp32 row copy
        // into a memmove call (rep movsb: ~30% of the time on this VM); −0 → +0 changes no LayerNorm output
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) v[c] = St::load(xi[c]) + 0.0f;
      }
      const float mu = vsum(store.data(), nv) / float(cols);
      // d = v − μ on the row, 0 on the padding, so that Σd² needs no correction
#pragma omp simd
      for (int64_t c = 0; c < nv * VW; ++c) d[c] = c < cols ? v[c] - mu : 0.f;
      const float rs = 1.0f / std::sqrt(vdot_shifted(centred.data(), 0.f, centred.data(), nv) / float(cols) + eps);
      mean[i] = mu;
      rstd[i] = rs;
      T* yi = y + i * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) yi[c] = St::store(d[c] * rs * w[c] + b[c]);
    }
  }
}

template <int DT>
void backward(const void* dy_, const void* dh_direct_, const void* h_, const float* w, const float* mean,
              const float* rstd, void* dh_, float* dw, float* db, int64_t rows, int64_t cols) {
  using T = typename Storage<DT>::T;
  const T* dy = static_cast<const T*>(dy_);
  const T* dd = static_cast<const T*>(dh_direct_);
  const T* h = static_cast<const T*>(h_);
  T* dh = static_cast<T*>(dh_);
  std::vector<float> ones;
  if (!w) {
    ones.assign(size_t(cols), 1.f);
    w = ones.data();
  }
  const int threads = omp_get_max_threads();
  ColumnPartials pw(threads, cols), pb(threads, cols);
  const int64_t nv = vectors_for(cols);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> buf(static_cast<size_t>(2 * nv));
    float *g = reinterpret_cast<float*>(buf.data()), *hat = g + nv * VW;
    const vf* gv = buf.data();
    const vf* hv = buf.data() + nv;
    float* accw = pw.of_thread(omp_get_thread_num());
    float* accb = pb.of_thread(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      // g = dy·w and ĥ straight from the rows (a separate copy became a memmove call costing ~30% here); the
      // padding lanes of g and hat stay 0 from the allocation, so the padded terms of both sums vanish
      const T* dyi = dy + i * cols;
      const T* hi = h + i * cols;
      const float mu = mean[i], rs = rstd[i];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        const float gy = Storage<DT>::load(dyi[c]);
        const float xh = (Storage<DT>::load(hi[c]) - mu) * rs;
        accw[c] += gy * xh;
        accb[c] += gy;
        hat[c] = xh;
        g[c] = gy * w[c];
      }
      const float mg = vsum(gv, nv) / float(cols), mgh = vdot_shifted(gv, 0.f, hv, nv) / float(cols);
      T* dhi = dh + i * cols;
      if (dd) {
        const T* ddi = dd + i * cols;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
          dhi[c] = Storage<DT>::store(rs * (g[c] - mg - hat[c] * mgh) + Storage<DT>::load(ddi[c]));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) dhi[c] = Storage<DT>::store(rs * (g[c] - mg - hat[c] * mgh));
      }
    }
  }
  pw.reduce_into(dw);
  pb.reduce_into(db);
}

void layer_norm_forward(int64_t x, int64_t r, int64_t w, int64_t b, int64_t y, int64_t h, int64_t mean,
                        int64_t rstd, int64_t rows, int64_t cols, double eps, int dtype) {
  dispatch_dtype(dtype, "layer_norm input", [&](auto d) {
    forward<decltype(d)::value>(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(r),
                                reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(b),
                                reinterpret_cast<void*>(y), reinterpret_cast<void*>(h), reinterpret_cast<float*>(mean),
                                reinterpret_cast<float*>(rstd), rows, cols, float(eps));
  });
}

void layer_norm_backward(int64_t dy, int64_t dh_direct, int64_t h, int64_t w, int64_t mean, int64_t rstd, int64_t dh,
                         int64_t dw, int64_t db, int64_t rows, int64_t cols, int dtype) {
  dispatch_dtype(dtype, "layer_norm input", [&](auto d) {
    backward<decltype(d)::value>(reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(dh_direct),
                                 reinterpret_cast<const void*>(h), reinterpret_cast<const float*>(w),
                                 reinterpret_cast<const float*>(mean), reinterpret_cast<const float*>(rstd),
                                 reinterpret_cast<void*>(dh), reinterpret_cast<float*>(dw),
                                 reinterpret_cast<float*>(db), rows, cols);
  });
}

}  // namespace

void register_layer_norm(py::module_& m) {
  m.def("layer_norm_forward", &layer_norm_forward,
        "y = LayerNorm(x [+ r]) per row; h = x + r stored when r != 0; saves mean and rstd (fp32). Addresses: 0 = none",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("h"),
        py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("dtype"));
  m.def("layer_norm_backward", &layer_norm_backward,
        "dh = LayerNorm'(h)ᵀ·dy + dh_direct; dw, db fp32 column sums (0 = not wanted)", py::arg("grad_y"),
        py::arg("grad_h"), py::arg("h"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("grad_input"),
        py::arg("grad_weight"), py::arg("grad_bias"), py::arg("rows"), py::arg("cols"), py::arg("dtype"));
}
