// CPU twin of the multi-tensor Adam step: OpenMP over chunks of all tensors, the per-element functor from
// common/adam.h in a `omp simd` loop (vectorised by -O3 -march=native). Same tables as the GPU backends.
#include <omp.h>

#include <pybind11/pybind11.h>

#include <cmath>
#include <vector>

#include "common/adam.h"

// Full-width vectors for this file's loops (the build prefers 256-bit ones, see setup.py): with stochastic rounding
// the bf16-state step is ALU-bound enough that half as many instructions show. AMD EPYC VM (Zen 4, AVX-512 run as
// two 256-bit halves), one AdamW step over ResNet-18's 11.7M parameters with bf16 state, interleaved with 256-bit
// builds: 5.17 -> 4.87 ms (torch fused fp32 6.48); fp32 state 6.53 -> 6.43. No effect without AVX-512.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif

namespace py = pybind11;
using namespace dlcore;

namespace {

// The element loop in a function of its own: inside the OpenMP region GCC gave up on most variants ("multiple
// nested loops"); here every variant vectorises.
template <int PD, int SD, bool AMS, bool MASTER>
__attribute__((noinline)) void adam_range(const int64_t* row, int64_t begin, int count, const AdamCoef coef) {
  // coef by value: read through a reference, its fields could alias the stores and could not be hoisted.
  const auto element = adam_element<PD, SD, AMS, MASTER>(row, begin);
  constexpr int kBlock = 1024;  // elements per prefetch step: 4 KiB of each fp32 stream
  for (int b = 0; b < count; b += kBlock) {
    const int n = std::min(kBlock, count - b);
    if (b + kBlock < count) element.prefetch(b + kBlock, std::min(kBlock, count - b - kBlock));
#pragma omp simd
    for (int i = b; i < b + n; ++i) element(i, coef);
  }
}

template <int PD, int SD, bool AMS, bool MASTER>
void adam_chunks(const int64_t* ptrs, int row_stride, const int64_t* numels, const float* scal,
                 const int64_t* chunks, int64_t n_chunks, int64_t chunk_size, const AdamHyper& h, float grad_scale) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t = chunks[2 * c], begin = chunks[2 * c + 1];
    const int64_t end = std::min(begin + chunk_size, numels[t]);
    const AdamCoef coef = adam_coef(h, scal + kScalars * t, t, begin, grad_scale);
    adam_range<PD, SD, AMS, MASTER>(ptrs + row_stride * t, begin, int(end - begin), coef);
  }
}

// The step counters and the scalar rows on the host, for the `cpu` backend (counts_steps): row t's slot kSteps
// holds the address of tensor t's fp32 step counter. step ← step + 1 (torch's _foreach_add_), then
// [lr, α = lr·√(1−β2ᵗ)/(1−β1ᵗ), ε̂ = ε·√(1−β2ᵗ), t] in double, rounded to fp32: scalar_table's expressions in
// dlcore/ops/adam.py with the same libm calls, so the same rows. Saves that path's ~6 tensor ops per step.
constexpr int kSteps = kSlots;  // the extra slot after the six of common/adam.h
std::vector<float> count_steps(const int64_t* ptrs, int row_stride, int64_t n, double lr, double eps, double beta1,
                               double beta2) {
  std::vector<float> scal(static_cast<size_t>(kScalars * n));
  for (int64_t t = 0; t < n; ++t) {
    float* step = reinterpret_cast<float*>(ptrs[row_stride * t + kSteps]);
    *step += 1.0f;
    const double s = *step, bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, s));
    float* row = scal.data() + kScalars * t;
    row[0] = float(lr);
    row[1] = float(lr * bc2_sqrt / (1.0 - std::pow(beta1, s)));
    row[2] = float(eps * bc2_sqrt);
    row[3] = float(s);
  }
  return scal;
}

// counts_steps: the scalar rows are derived here from the step counters (see count_steps; `scal` is unused,
// rows have kSlots + 1 addresses), after a found_inf skip (a skipped step does not count, as in torch's fused Adam).
void adam_step(int64_t ptrs, int64_t numels, int64_t scal, int64_t chunks, int64_t n_chunks, int64_t chunk_size,
               int param_dtype, int state_dtype, bool amsgrad, bool master, double beta1, double beta2,
               float one_minus_beta1, float one_minus_beta2, float weight_decay, bool decoupled, bool maximize,
               uint32_t seed, int64_t grad_scale_ptr, int64_t found_inf_ptr, bool counts_steps, int64_t n_tensors,
               double lr, double eps) {
  if (chunk_size > (1 << 30)) throw std::invalid_argument("dlcore: chunk_size must fit 32-bit offsets");
  if (found_inf_ptr && *reinterpret_cast<const float*>(found_inf_ptr) != 0.0f) return;  // GradScaler: skip
  const float grad_scale = grad_scale_ptr ? *reinterpret_cast<const float*>(grad_scale_ptr) : 1.0f;
  const AdamHyper h{float(beta1), float(beta2), one_minus_beta1, one_minus_beta2, weight_decay, decoupled, maximize,
                    seed};
  const auto* table = reinterpret_cast<const int64_t*>(ptrs);
  const int row_stride = counts_steps ? kSlots + 1 : kSlots;
  std::vector<float> rows;
  if (counts_steps) rows = count_steps(table, row_stride, n_tensors, lr, eps, beta1, beta2);
  const float* scalars = counts_steps ? rows.data() : reinterpret_cast<const float*>(scal);
  py::gil_scoped_release release;
  dispatch_adam(param_dtype, state_dtype, amsgrad, master, [&](auto pd, auto sd, auto ams, auto mw) {
    adam_chunks<decltype(pd)::value, decltype(sd)::value, decltype(ams)::value, decltype(mw)::value>(
        table, row_stride, reinterpret_cast<const int64_t*>(numels), scalars,
        reinterpret_cast<const int64_t*>(chunks), n_chunks, chunk_size, h, grad_scale);
  });
}

}  // namespace

void register_adam(py::module_& m) {
  m.def("adam_step", &adam_step,
        "Multi-tensor Adam/AdamW step over the tables described in csrc/common/adam.h (all addresses are CPU).",
        py::arg("ptrs"), py::arg("numels"), py::arg("scal"), py::arg("chunks"), py::arg("n_chunks"),
        py::arg("chunk_size"), py::arg("param_dtype"), py::arg("state_dtype"), py::arg("amsgrad"),
        py::arg("master"), py::arg("beta1"), py::arg("beta2"), py::arg("one_minus_beta1"),
        py::arg("one_minus_beta2"), py::arg("weight_decay"),
        py::arg("decoupled"), py::arg("maximize"), py::arg("seed"), py::arg("grad_scale_ptr"),
        py::arg("found_inf_ptr"), py::arg("counts_steps") = false, py::arg("n_tensors") = 0, py::arg("lr") = 0.0,
        py::arg("eps") = 0.0);
}
