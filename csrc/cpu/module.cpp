// dlcore._C_cpu: the CPU twins. Plain pybind11: raw addresses and sizes in, no torch headers.
#include <omp.h>

#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_adam(py::module_& m);

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
  register_adam(m);
}
