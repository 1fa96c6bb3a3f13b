// dlcore._C_cpu: the CPU twins. Plain pybind11: raw addresses and sizes in, no torch headers.
#include <omp.h>

#include <pybind11/pybind11.h>

#include "common/adam.h"

namespace py = pybind11;
using namespace dlcore;

namespace {
// out[i] = dtype_out(in[i]) through the Storage conversions every kernel uses (round to nearest even).
void cast(int64_t in, int64_t out, int64_t n, int in_dtype, int out_dtype) {
  dispatch_dtype(in_dtype, "input", [&](auto id) {
    dispatch_dtype(out_dtype, "output", [&](auto od) {
      using I = Storage<decltype(id)::value>;
      using O = Storage<decltype(od)::value>;
      const auto* src = reinterpret_cast<const typename I::T*>(in);
      auto* dst = reinterpret_cast<typename O::T*>(out);
#pragma omp parallel for simd
      for (int64_t i = 0; i < n; ++i) dst[i] = O::store(I::load(src[i]));
    });
  });
}
}  // namespace

void register_adam(py::module_& m);
void register_gather(py::module_& m);
void register_attention(py::module_& m);
void register_layer_norm(py::module_& m);
void register_bias_gelu(py::module_& m);
void register_cross_entropy(py::module_& m);
void register_additive_attention(py::module_& m);
void register_batch_norm(py::module_& m);
void register_nt_xent(py::module_& m);
void register_pool_epilogue(py::module_& m);
void register_sum_tree(py::module_& m);
void register_skinny_linear(py::module_& m);
void register_conv_input_grad(py::module_& m);
void register_layout(py::module_& m);
void register_winograd(py::module_& m);

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "dlcore CPU kernels (OpenMP, vectorised for the machine they were built on)";
  m.def("max_threads", []() { return omp_get_max_threads(); }, "OpenMP threads a parallel region will use");
#if defined(__AVX512F__)
  m.attr("simd") = "avx512";
#elif defined(__AVX2__)
  m.attr("simd") = "avx2";
#else
  m.attr("simd") = "baseline";
#endif
  m.def("cast", &cast, "Convert n elements between fp32/bf16/fp16 (dtype codes) with the kernels' rounding",
        py::arg("input"), py::arg("output"), py::arg("n"), py::arg("input_dtype"), py::arg("output_dtype"));
  register_adam(m);
  register_sum_tree(m);
  register_skinny_linear(m);
  register_conv_input_grad(m);
  register_layout(m);
  register_winograd(m);
  register_gather(m);
  register_attention(m);
  register_layer_norm(m);
  register_bias_gelu(m);
  register_cross_entropy(m);
  register_additive_attention(m);
  register_batch_norm(m);
  register_nt_xent(m);
  register_pool_epilogue(m);
}
