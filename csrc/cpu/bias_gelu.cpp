// The CPU twin of dlcore's fused bias + activation (dlcore/ops/bias_gelu.py): y = act(x + b) over rows × cols, fp32
// math on fp32/bf16/fp16 storage, bias fp32. OpenMP over rows; each row in 16-float vectors with polynomial
// exp/erf (common/vec_math.h) so that the transcendental loops vectorise.
//   exact (erf):  gelu(u) = u·Φ(u) = ½u(1 + erf(u/√2));         gelu'(u) = Φ(u) + u·φ(u),  φ(u) = e^{−u²/2}/√(2π)
//   tanh:         gelu(u) = ½u(1 + tanh(k(u + a·u³))), k = √(2/π), a = 0.044715;
//                 gelu'(u) = ½(1 + t) + ½u(1 − t²)·k(1 + 3a·u²),  t = tanh(k(u + a·u³))
//   relu:         max(u, 0), relu'(u) = [u > 0];   identity: u, 1   (dropout alone: no bias, identity)
//   backward also gives db = Σ_rows dy·act'(u) (per-thread partials, combined in thread order).
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

// Activation codes shared with dlcore/ops/bias_gelu.py (ACTIVATIONS).
enum Activation { kGelu = 0, kGeluTanh = 1, kRelu = 2, kIdentity = 3 };

template <int ACT>
inline vf activate(vf u) {
  if constexpr (ACT == kGeluTanh) return 0.5f * u * (1.0f + tanhv(kTanhK * (u + kTanhA * u * u * u)));
  else if constexpr (ACT == kGelu) return 0.5f * u * (1.0f + erfv(u * kSqrt1_2));
  else if constexpr (ACT == kRelu) return u < 0.0f ? vf{} : u;  // a NaN stays NaN, as in torch.relu
  else return u;
}

template <int ACT>
inline vf activation_grad(vf u) {
  if constexpr (ACT == kGeluTanh) {
    const vf t = tanhv(kTanhK * (u + kTanhA * u * u * u));
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kTanhK * (1.0f + 3.0f * kTanhA * u * u);
  } else if constexpr (ACT == kGelu) {
    return 0.5f * (1.0f + erfv(u * kSqrt1_2)) + u * kInvSqrt2Pi * expv_neg(-0.5f * u * u);
  } else if constexpr (ACT == kRelu) {
    return u > 0.0f ? vf{} + 1.0f : vf{};
  } else {
    return vf{} + 1.0f;
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

template <int DT, int ACT>
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
        buf[size_t(k)] = drop.apply(activate<ACT>(buf[size_t(k)] + b[size_t(k)]), i, k * VW);
      store_row<DT>(v, cols, y + i * cols);
    }
  }
}

template <int DT, int ACT>
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
        g[k] = drop.apply(g[k], i, k * VW) * activation_grad<ACT>(u[k] + b[size_t(k)]);
        acc[k] += g[k];
      }
      store_row<DT>(reinterpret_cast<float*>(g), cols, dx + i * cols);
    }
  }
  partial.reduce_into(db);
}

template <class F>
void dispatch(int dtype, int activation, F&& f) {
  dispatch_dtype(dtype, "bias_gelu input", [&](auto d) {
    switch (activation) {
      case kGelu: f(d, IntC<kGelu>{}); break;
      case kGeluTanh: f(d, IntC<kGeluTanh>{}); break;
      case kRelu: f(d, IntC<kRelu>{}); break;
      case kIdentity: f(d, IntC<kIdentity>{}); break;
      default: throw std::invalid_argument("dlcore: unknown bias_gelu activation code");
    }
  });
}

void bias_gelu_forward(int64_t x, int64_t bias, int64_t y, int64_t rows, int64_t cols, int activation, int dtype,
                       uint64_t seed, uint64_t threshold, double drop_scale) {
  const Dropout drop{seed, threshold, float(drop_scale)};
  dispatch(dtype, activation, [&](auto d, auto t) {
    forward<decltype(d)::value, decltype(t)::value>(reinterpret_cast<const void*>(x),
                                                    reinterpret_cast<const float*>(bias),
                                                    reinterpret_cast<void*>(y), rows, cols, drop);
  });
}

void bias_gelu_backward(int64_t dy, int64_t x, int64_t bias, int64_t dx, int64_t db, int64_t rows, int64_t cols,
                        int activation, int dtype, uint64_t seed, uint64_t threshold, double drop_scale) {
  const Dropout drop{seed, threshold, float(drop_scale)};
  dispatch(dtype, activation, [&](auto d, auto t) {
    backward<decltype(d)::value, decltype(t)::value>(
        reinterpret_cast<const void*>(dy), reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(bias),
        reinterpret_cast<void*>(dx), reinterpret_cast<float*>(db), rows, cols, drop);
  });
}

}  // namespace

void register_bias_gelu(py::module_& m) {
  m.def("bias_gelu_forward", &bias_gelu_forward, "y = act(x + bias) per row (bias fp32 or 0; y may alias x)",
        py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("activation"),
        py::arg("dtype"), py::arg("seed") = 0, py::arg("threshold") = 0, py::arg("drop_scale") = 1.0);
  m.def("bias_gelu_backward", &bias_gelu_backward, "dx = dy·act'(x + bias); db = column sums of dx (fp32, 0 = none)",
        py::arg("grad_y"), py::arg("x"), py::arg("bias"), py::arg("grad_x"), py::arg("grad_bias"), py::arg("rows"),
        py::arg("cols"), py::arg("activation"), py::arg("dtype"), py::arg("seed") = 0, py::arg("threshold") = 0,
        py::arg("drop_scale") = 1.0);
}
