// Storage types shared by the CPU and CUDA backends: fp32, bf16 and fp16 held as raw bits, converted to fp32 for
// the math. One header for both compilers, so the CPU twin and the CUDA kernel round exactly alike.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define DL_HD __host__ __device__ __forceinline__
#else
#define DL_HD inline __attribute__((always_inline))
#endif

namespace dlcore {

// Dtype codes passed from Python as plain integers (dlcore/_ext.py: DTYPE_CODE).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

DL_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

DL_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// bf16 is the top half of an fp32. Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate.
DL_HD uint16_t f32_to_bf16_rne(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Stochastic rounding: add 16 random bits below the cut, then truncate. E[result] = f exactly (up to the bf16
// range), which keeps small optimizer-state updates from vanishing in bf16.
DL_HD uint16_t f32_to_bf16_sr(float f, uint32_t random16) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) >= 0x7F800000u) return f32_to_bf16_rne(f);  // Inf/NaN unchanged
  u += (random16 & 0xFFFFu);
  return uint16_t(u >> 16);
}

DL_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

DL_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return float(x);
#endif
}

DL_HD uint16_t f32_to_f16(float f) {  // round to nearest even, as torch's .half()
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  _Float16 x = _Float16(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
#endif
}

// lowbias32 (Chris Wellons' integer hash): a cheap counter-based generator. Triton's kernels/_common.py and the
// reference in dlcore/ops/adam.py compute the same function, so stochastic rounding is bit-identical across
// backends given the same fp32 input.
DL_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

template <int DT> struct Storage;
template <> struct Storage<kF32> {
  using T = float;
  static DL_HD float load(T x) { return x; }
  static DL_HD T store(float x) { return x; }
  static DL_HD T store_sr(float x, uint32_t) { return x; }
};
template <> struct Storage<kBF16> {
  using T = uint16_t;
  static DL_HD float load(T x) { return bf16_to_f32(x); }
  static DL_HD T store(float x) { return f32_to_bf16_rne(x); }
  static DL_HD T store_sr(float x, uint32_t r) { return f32_to_bf16_sr(x, r); }
};
template <> struct Storage<kF16> {
  using T = uint16_t;
  static DL_HD float load(T x) { return f16_to_f32(x); }
  static DL_HD T store(float x) { return f32_to_f16(x); }
  static DL_HD T store_sr(float x, uint32_t) { return f32_to_f16(x); }  // fp16 state rounds to nearest
};

}  // namespace dlcore
