// Every CUDA call and launch is checked; a failure becomes a C++ exception that pybind11 turns into a Python
// RuntimeError naming the call, never a crash or a silent error left for the next kernel to report.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define DL_CUDA_CHECK(expr)                                                                                    \
  do {                                                                                                         \
    cudaError_t err__ = (expr);                                                                                \
    if (err__ != cudaSuccess) {                                                                                \
      (void)cudaGetLastError(); /* clear the sticky-free error so the next call starts clean */               \
      throw std::runtime_error(std::string("dlcore CUDA error in ") + #expr + " (" + __FILE__ + ":" +          \
                               std::to_string(__LINE__) + "): " + cudaGetErrorString(err__));                 \
    }                                                                                                          \
  } while (0)

#define DL_CUDA_CHECK_LAUNCH() DL_CUDA_CHECK(cudaGetLastError())

inline cudaStream_t as_stream(long long stream) { return reinterpret_cast<cudaStream_t>(stream); }
