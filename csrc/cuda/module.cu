// dlcore._C_cuda: the CUDA C++ kernels. Plain pybind11 with device pointers and the stream as integers; cudart is
// linked statically, so the module imports on a machine without a GPU and a call raises RuntimeError there.
#include <pybind11/pybind11.h>

#include "cuda/check.h"

namespace py = pybind11;

void register_adam(py::module_& m);
void register_sum_tree(py::module_& m);
void register_batch_norm(py::module_& m);
void register_conv_pool(py::module_& m);
void register_attention(py::module_& m);

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "dlcore CUDA C++ kernels";
  m.def("device_count", []() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  });
  m.def("synchronize", []() { DL_CUDA_CHECK(cudaDeviceSynchronize()); });
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  register_adam(m);
  register_sum_tree(m);
  register_batch_norm(m);
  register_conv_pool(m);
  register_attention(m);
}
