// The CPU twin's epilogue of conv2d_relu (dlcore/ops/conv_relu.py): the convolution itself is torch's (oneDNN),
// the per-channel bias, the ReLU and their backward are one pass each here, fp32.
// A tensor of C channels is addressed as [outer, C, inner]: NCHW is (N, C, H·W), channels_last is (N·H·W, C, 1).
//   forward, in place:  y ← max(y + b_c, 0)
//   backward:           dz = dy · [y > 0]  (y is the saved output: y > 0 ⇔ z + b > 0),  db_c = Σ dz over outer, inner
#include <omp.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace {

void bias_relu_forward(int64_t y_addr, int64_t bias_addr, int64_t outer, int64_t channels, int64_t inner) {
  float* y = reinterpret_cast<float*>(y_addr);
  const float* bias = reinterpret_cast<const float*>(bias_addr);  // 0: no bias
  if (inner == 1) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < outer; ++o) {
      float* row = y + o * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float v = row[c] + (bias ? bias[c] : 0.0f);
        row[c] = v > 0.0f ? v : 0.0f;
      }
    }
    return;
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t c = 0; c < channels; ++c) {
      float* plane = y + (o * channels + c) * inner;
      const float b = bias ? bias[c] : 0.0f;
#pragma omp simd
      for (int64_t i = 0; i < inner; ++i) {
        const float v = plane[i] + b;
        plane[i] = v > 0.0f ? v : 0.0f;
      }
    }
}

// grad_bias may be 0 (no bias). Sums in double per thread, then combined in thread order: deterministic for a given
// thread count.
void bias_relu_backward(int64_t dy_addr, int64_t y_addr, int64_t dz_addr, int64_t grad_bias_addr, int64_t outer,
                        int64_t channels, int64_t inner) {
  const float* dy = reinterpret_cast<const float*>(dy_addr);
  const float* y = reinterpret_cast<const float*>(y_addr);
  float* dz = reinterpret_cast<float*>(dz_addr);
  float* grad_bias = reinterpret_cast<float*>(grad_bias_addr);
  const int threads = omp_get_max_threads();
  std::vector<double> partial(size_t(threads) * size_t(channels), 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* acc = partial.data() + size_t(omp_get_thread_num()) * size_t(channels);
    if (inner == 1) {
#pragma omp for schedule(static)
      for (int64_t o = 0; o < outer; ++o) {
        const int64_t base = o * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const float g = y[base + c] > 0.0f ? dy[base + c] : 0.0f;
          dz[base + c] = g;
          acc[c] += g;
        }
      }
    } else {
#pragma omp for collapse(2) schedule(static)
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t base = (o * channels + c) * inner;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < inner; ++i) {
            const float g = y[base + i] > 0.0f ? dy[base + i] : 0.0f;
            dz[base + i] = g;
            sum += g;
          }
          acc[c] += sum;
        }
    }
  }
  if (grad_bias)
    for (int64_t c = 0; c < channels; ++c) {
      double s = 0.0;
      for (int t = 0; t < threads; ++t) s += partial[size_t(t) * size_t(channels) + size_t(c)];
      grad_bias[c] = float(s);
    }
}

}  // namespace

void register_bias_relu(py::module_& m) {
  m.def("bias_relu_forward", &bias_relu_forward, "y <- max(y + bias[c], 0) in place, fp32, y as [outer, C, inner]",
        py::arg("y"), py::arg("bias"), py::arg("outer"), py::arg("channels"), py::arg("inner"));
  m.def("bias_relu_backward", &bias_relu_backward, "dz = dy * (y > 0); grad_bias[c] = sum of dz over channel c",
        py::arg("dy"), py::arg("y"), py::arg("dz"), py::arg("grad_bias"), py::arg("outer"), py::arg("channels"),
        py::arg("inner"));
}
