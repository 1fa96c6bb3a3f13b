// CUDA multi-tensor Adam/AdamW: one launch per (device, dtype) group, one block per chunk of one tensor. The
// per-element math is the functor in common/adam.h (shared with the CPU twin); this file only maps chunks to
// blocks. found_inf and grad_scale are read on the device, so the step is CUDA-graph safe (capturable).
#include <pybind11/pybind11.h>

#include "common/adam.h"
#include "cuda/check.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

// 256 threads × 64 elements per chunk, four loop iterations in flight: 512 threads capped registers at 128
// and spilled the AMSGrad variants.
constexpr int kThreads = 256;

template <int PD, int SD, bool AMS, bool MASTER>
__global__ void __launch_bounds__(kThreads) adam_kernel(const int64_t* __restrict__ ptrs,
                                                        const int64_t* __restrict__ numels,
                                                        const float* __restrict__ scal,
                                                        const int64_t* __restrict__ chunks, int64_t chunk_size,
                                                        AdamHyper h, const float* grad_scale,
                                                        const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int64_t t = chunks[2 * blockIdx.x], begin = chunks[2 * blockIdx.x + 1];
  const int count = int(min(chunk_size, numels[t] - begin));
  const AdamCoef coef = adam_coef(h, scal + kScalars * t, t, begin, grad_scale ? *grad_scale : 1.0f);
  const auto element = adam_element<PD, SD, AMS, MASTER>(ptrs + kSlots * t, begin);
#pragma unroll 4
  for (int i = threadIdx.x; i < count; i += kThreads) element(i, coef);
}

void adam_step(int64_t ptrs, int64_t numels, int64_t scal, int64_t chunks, int64_t n_chunks, int64_t chunk_size,
               int param_dtype, int state_dtype, bool amsgrad, bool master, float beta1, float beta2, float one_minus_beta1,
               float one_minus_beta2,
               float weight_decay, bool decoupled, bool maximize, uint32_t seed, int64_t grad_scale_ptr,
               int64_t found_inf_ptr, long long stream) {
  if (n_chunks == 0) return;
  if (n_chunks > 0x7FFFFFFF) throw std::invalid_argument("dlcore: too many chunks for one launch");
  if (chunk_size > (1 << 30)) throw std::invalid_argument("dlcore: chunk_size must fit 32-bit offsets");
  const AdamHyper h{beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, decoupled, maximize, seed};
  dispatch_adam(param_dtype, state_dtype, amsgrad, master, [&](auto pd, auto sd, auto ams, auto mw) {
    adam_kernel<decltype(pd)::value, decltype(sd)::value, decltype(ams)::value, decltype(mw)::value>
        <<<unsigned(n_chunks), kThreads, 0, as_stream(stream)>>>(
            reinterpret_cast<const int64_t*>(ptrs), reinterpret_cast<const int64_t*>(numels),
            reinterpret_cast<const float*>(scal), reinterpret_cast<const int64_t*>(chunks), chunk_size, h,
            reinterpret_cast<const float*>(grad_scale_ptr), reinterpret_cast<const float*>(found_inf_ptr));
  });
  DL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void register_adam(py::module_& m) {
  m.def("adam_step", &adam_step,
        "Multi-tensor Adam/AdamW step over the tables described in csrc/common/adam.h (all addresses on the "
        "device; stream as an integer).",
        py::arg("ptrs"), py::arg("numels"), py::arg("scal"), py::arg("chunks"), py::arg("n_chunks"),
        py::arg("chunk_size"), py::arg("param_dtype"), py::arg("state_dtype"), py::arg("amsgrad"),
        py::arg("master"), py::arg("beta1"), py::arg("beta2"), py::arg("one_minus_beta1"),
        py::arg("one_minus_beta2"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("maximize"), py::arg("seed"), py::arg("grad_scale_ptr"),
        py::arg("found_inf_ptr"), py::arg("stream"));
}
