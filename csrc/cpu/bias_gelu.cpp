// The CPU twin of dlcore's fused bias + GELU (dlcore/ops/bias_gelu.py): y = gelu(x + b) over rows × cols, fp32
// math on fp32/bf16/fp16 storage, bias fp32. OpenMP over rows; each row in 16-float vectors with polynomial
// exp/erf (common/vec_math.h) so that the transcendental loops vectorise.
//   exact (erf):  gelu(u) = u·Φ(u) = ½u(1 + erf(u/√2));         gelu'(u) = Φ(u) + u·φ(u),  φ(u) = e^{−u²/2}/√(2π)
//   tanh:         gelu(u) = ½u(1 + tanh(k(u + a·u³))), k = √(2/π), a = 0.044715;
//                 gelu'(u) = ½(1 + t) + ½u(1 − t²)·k(1 + 3a·u²),  t = tanh(k(u + a·u³))
//   backward also gives db = Σ_rows dy·gelu'(u) (per-thread partials, combined in thread order).
// Dropout after the activation (threshold > 0): y = gelu(u)·keep/(1−p), keep from Philox (common/philox.h) with
// counter (col, row, 0, 0), regenerated in backward (dx = dy·keep/(1−p)·gelu'(u)); nothing is stored.
#include <omp.h>
#include <pybind11/pybind11.h>

#include <vector>

#include "common/philox.h"
#include "common/rows.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

constexpr float kSqrt1_2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK = 0.79788456080286536f;
constexpr float kTanhA = 0.044715f;

template <bool TANH>
inline vf gelu(vf u) {
  if constexpr (TANH) return 0.5f * u * (1.0f + tanhv(kTanhK * (u + kTanhA * u * u * u)));
  else return 0.5f * u * (1.0f + erfv(u * kSqrt1_2));
}

template <bool TANH>
inline vf gelu_grad(vf u) {
  if constexpr (TANH) {
    const vf t = tanhv(kTanhK * (u + kTanhA * u * u * u));
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kTanhK * (1.0f + 3.0f * kTanhA * u * u);
  } else {
    return 0.5f * (1.0f + erfv(u * kSqrt1_2)) + u * kInvSqrt2Pi * expv_neg(-0.5f * u * u);
  }
}

struct Dropout {
  uint64_t seed, threshold;
  float scale;
  // v ← v·keep·scale for the 16 columns starting at c of `row` (no-op without dropout)
  inline vf apply(vf v, int64_t row, int64_t c) const {
    if (!threshold) return v;
    const philox_vi keep = dropout_keep16(seed, uint32_t(row), uint32_t(c), 0, threshold);
    return keep != 0 ? v * scale : vf{};
  }
};

template <int DT, bool TANH>
void forward(const void* x_, const float* bias, void* y_, int64_t rows, int64_t cols, Dropout drop) {
  using T = typename Storage<DT>::T;
  const T* x = static_cast<const T*>(x_);
  T* y = static_cast<T*>(y_);
  const int64_t nv = vectors_for(cols);
  std::vector<vf> b(static_cast<size_t>(nv));
  float* bf = reinterpret_cast<float*>(b.data());
  for (int64_t c = 0; c < nv * VW; ++c) bf[c] = bias && c < cols ? bias[c] : 0.f;
#pragma omp parallel
  {
    std::vector<vf> buf(static_cast<size_t>(nv));
    float* v = reinterpret_cast<float*>(buf.data());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      load_row<DT>(x + i * cols, cols, v, 0.f);
      for (int64_t k = 0; k < nv; ++k)
        buf[size_t(k)] = drop.apply(gelu<TANH>(buf[size_t(k)] + b[size_t(k)]), i, k * VW);
      store_row<DT>(v, cols, y + i * cols);
    }
  }
}

template <int DT, bool TANH>
void backward(const void* dy_, const void* x_, const float* bias, void* dx_, float* db, int64_t rows, int64_t cols,
              Dropout drop) {
  using T = typename Storage<DT>::T;
  const T* dy = static_cast<const T*>(dy_);
  const T* x = static_cast<const T*>(x_);
  T* dx = static_cast<T*>(dx_);
  const int64_t nv = vectors_for(cols);
  std::vector<vf> b(static_cast<size_t>(nv));
  float* bf = reinterpret_cast<float*>(b.data());
  for (int64_t c = 0; c < nv * VW; ++c) bf[c] = bias && c < cols ? bias[c] : 0.f;
  const int threads = omp_get_max_threads();
  ColumnPartials partial(threads, cols);
#pragma omp parallel num_threads(threads)
  {
    std::vector<vf> buf(size_t(2 * nv));
    vf *u = buf.data(), *g = u + nv;
    vf* acc = reinterpret_cast<vf*>(partial.of_thread(omp_get_thread_num()));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      load_row<DT>(x + i * cols, cols, reinterpret_cast<float*>(u), 0.f);
      load_row<DT>(dy + i * cols, cols, reinterpret_cast<float*>(g), 0.f);  // pad 0: tail lanes add nothing
      for (int64_t k = 0; k < nv; ++k) {
        g[k] = drop.apply(g[k], i, k * VW) * gelu_grad<TANH>(u[k] + b[size_t(k)]);
        acc[k] += g[k];
      }
      store_row<DT>(reinterpret_cast<float*>(g), cols, dx + i * cols);
    }
  }
  partial.reduce_into(db);
}

template <class F>
void dispatch(int dtype, bool tanh, F&& f) {
  dispatch_dtype(dtype, "bias_gelu input", [&](auto d) { dispatch_bool(tanh, [&](auto t) { f(d, t); }); });
}

void bias_gelu_forward(int64_t x, int64_t bias, int64_t y, int64_t rows, int64_t cols, bool tanh, int dtype,
                       uint64_t seed, uint64_t threshold, double drop_scale) {
  const Dropout drop{seed, threshold, float(drop_scale)};
  dispatch(dtype, tanh, [&](auto d, auto t) {
    forward<decltype(d)::value, decltype(t)::value>(reinterpret_cast<const void*>(x),
                                                    reinterpret_cast<const float*>(bias),
                                                    reinterpret_cast<void*>(y), rows, cols, drop);
  });
}

void bias_gelu_backward(int64_t dy, int64_t x, int64_t bias, int64_t dx, int64_t db, int64_t rows, int64_t cols,
                        bool tanh, int dtype, uint64_t seed, uint64_t threshold, double drop_scale) {
  const Dropout drop{seed, threshold, float(drop_scale)};
  dispatch(dtype, tanh, [&](auto d, auto t) {
    backward<decltype(d)::value, decltype(t)::value>(
        reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(bias),
        reinterpret_cast<void*>(dx), reinterpret_cast<float*>(db), rows, cols, drop);
  });
}

}  // namespace

void register_bias_gelu(py::module_& m) {
  m.def("bias_gelu_forward", &bias_gelu_forward, "y = gelu(x + bias) per row (bias fp32 or 0; y may alias x)",
        py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("tanh"),
        py::arg("dtype"), py::arg("seed") = 0, py::arg("threshold") = 0, py::arg("drop_scale") = 1.0);
  m.def("bias_gelu_backward", &bias_gelu_backward, "dx = dy·gelu'(x + bias); db = column sums of dx (fp32, 0 = none)",
        py::arg("grad_y"), py::arg("x"), py::arg("bias"), py::arg("grad_x"), py::arg("grad_bias"), py::arg("rows"),
        py::arg("cols"), py::arg("tanh"), py::arg("dtype"), py::arg("seed") = 0, py::arg("threshold") = 0,
        py::arg("drop_scale") = 1.0);
}
