// The CPU twin of dlcore's softmax cross-entropy (dlcore/ops/cross_entropy.py), one row of V logits per task,
// OpenMP over rows, fp32 math on fp32/bf16/fp16 logits. With label smoothing ε (torch's definition):
//   lse = log Σ_j e^{z_j},  loss = lse − (1 − ε)·z_t − (ε/V)·Σ_j z_j,  0 for a row whose target is ignore_index;
//   ∂loss/∂z_j = softmax_j − ε/V − (1 − ε)·[j = t].
// forward:  loss and lse per row; optionally also the gradient times a uniform scale, written over the logits
//           or elsewhere (the fused linear + cross-entropy computes it while the row is still in cache).
// backward: the gradient from saved lse, times a per-row scale (the incoming gradient of each row's loss).
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/rows.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Rows {
  const void* logits;
  int64_t stride;  // elements between rows of logits (and of the gradient)
  const int64_t* target;
  int64_t n, V, ignore_index;
  float smoothing;
};

// row ← e^{row − lse}·scale − (ε/V)·scale, then −(1 − ε)·scale at the target; stored into out
template <int DT>
inline void write_grad(float* row, int64_t V, int64_t nv, float lse, float scale, float smoothing, int64_t t,
                       typename Storage<DT>::T* out) {
  vf* v = reinterpret_cast<vf*>(row);
  const float uniform = smoothing / float(V) * scale;
  for (int64_t k = 0; k < nv; ++k) v[k] = exp2v((v[k] - lse) * kLog2e) * scale - uniform;
  row[t] -= (1.0f - smoothing) * scale;
  store_row<DT>(row, V, out);
}

template <int DT>
void forward(const Rows& p, float* loss, float* lse_out, void* grad_, float grad_scale) {
  using T = typename Storage<DT>::T;
  const T* z = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(grad_);
  const int64_t nv = vectors_for(p.V);
#pragma omp parallel
  {
    std::vector<vf> buf(static_cast<size_t>(nv));
    float* row = reinterpret_cast<float*>(buf.data());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t t = p.target[i];
      const bool ignored = t == p.ignore_index;
      load_row<DT>(z + i * p.stride, p.V, row, kNegInf);
      vf m = vf{} + kNegInf, s = {};
      for (int64_t k = 0; k < nv; ++k) {
        m = vmax(m, buf[size_t(k)]);
        s += buf[size_t(k)] > kNegInf ? buf[size_t(k)] : 0.0f;  // Σz without the -inf padding
      }
      const float mx = max_lanes(m);
      const float shift = std::isfinite(mx) ? mx : 0.f;
      vf e = {};
      for (int64_t k = 0; k < nv; ++k) e += exp2v((buf[size_t(k)] - shift) * kLog2e);
      const float l = shift + std::log(sum_lanes(e));
      lse_out[i] = l;
      loss[i] = ignored ? 0.f : l - (1.0f - p.smoothing) * row[t] - p.smoothing / float(p.V) * sum_lanes(s);
      if (grad) {
        T* out = grad + i * p.stride;
        if (ignored) {
          for (int64_t j = 0; j < p.V; ++j) out[j] = Storage<DT>::store(0.f);
        } else {
          write_grad<DT>(row, p.V, nv, l, grad_scale, p.smoothing, t, out);
        }
      }
    }
  }
}

template <int DT>
void backward(const Rows& p, const float* lse, const float* scale, int64_t scale_stride, void* grad_) {
  using T = typename Storage<DT>::T;
  const T* z = static_cast<const T*>(p.logits);
  T* grad = static_cast<T*>(grad_);
  const int64_t nv = vectors_for(p.V);
#pragma omp parallel
  {
    std::vector<vf> buf(static_cast<size_t>(nv));
    float* row = reinterpret_cast<float*>(buf.data());
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.n; ++i) {
      const int64_t t = p.target[i];
      T* out = grad + i * p.stride;
      if (t == p.ignore_index) {
        for (int64_t j = 0; j < p.V; ++j) out[j] = Storage<DT>::store(0.f);
        continue;
      }
      load_row<DT>(z + i * p.stride, p.V, row, kNegInf);
      write_grad<DT>(row, p.V, nv, lse[i], scale[i * scale_stride], p.smoothing, t, out);
    }
  }
}

void cross_entropy_forward(int64_t logits, int64_t stride, int64_t target, int64_t loss, int64_t lse, int64_t grad,
                           double grad_scale, int64_t rows, int64_t V, int64_t ignore_index, double smoothing,
                           int dtype) {
  const Rows p{reinterpret_cast<const void*>(logits), stride, reinterpret_cast<const int64_t*>(target), rows, V,
               ignore_index, float(smoothing)};
  dispatch_dtype(dtype, "cross_entropy logits", [&](auto d) {
    forward<decltype(d)::value>(p, reinterpret_cast<float*>(loss), reinterpret_cast<float*>(lse),
                                reinterpret_cast<void*>(grad), float(grad_scale));
  });
}

void cross_entropy_backward(int64_t logits, int64_t stride, int64_t target, int64_t lse, int64_t scale,
                            int64_t scale_stride, int64_t grad, int64_t rows, int64_t V, int64_t ignore_index,
                            double smoothing, int dtype) {
  const Rows p{reinterpret_cast<const void*>(logits), stride, reinterpret_cast<const int64_t*>(target), rows, V,
               ignore_index, float(smoothing)};
  dispatch_dtype(dtype, "cross_entropy logits", [&](auto d) {
    backward<decltype(d)::value>(p, reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(scale),
                                 scale_stride, reinterpret_cast<void*>(grad));
  });
}

}  // namespace

void register_cross_entropy(py::module_& m) {
  m.def("cross_entropy_forward", &cross_entropy_forward,
        "loss, lse per row (fp32); grad != 0: also ∂loss/∂logits·grad_scale written there (may alias logits). "
        "Targets must be in [0, V) or ignore_index (checked by the caller)",
        py::arg("logits"), py::arg("stride"), py::arg("target"), py::arg("loss"), py::arg("lse"), py::arg("grad"),
        py::arg("grad_scale"), py::arg("rows"), py::arg("V"), py::arg("ignore_index"), py::arg("smoothing"),
        py::arg("dtype"));
  m.def("cross_entropy_backward", &cross_entropy_backward,
        "grad = ∂loss/∂logits · scale[i·scale_stride] from the saved lse (may alias logits)", py::arg("logits"),
        py::arg("stride"), py::arg("target"), py::arg("lse"), py::arg("scale"), py::arg("scale_stride"),
        py::arg("grad"), py::arg("rows"), py::arg("V"), py::arg("ignore_index"), py::arg("smoothing"),
        py::arg("dtype"));
}
