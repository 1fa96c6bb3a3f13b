// Storage types shared by the CPU and CUDA backends: fp32, bf16 and fp16 held as raw bits, converted to fp32 for
// the math. One header for both compilers, so the CPU twin and the CUDA kernel round exactly alike.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// Branch-free so that the CPU loops vectorise; a NaN is first made the canonical quiet NaN, which rounds to itself
// (a float compare-and-select: cheaper in the vector loop than an integer test on the bits).
DL_HD uint16_t f32_to_bf16_rne(float f) {
  const uint32_t u = f32_bits(f == f ? f : bits_f32(0x7FC00000u));
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Stochastic rounding: add 16 random bits below the cut, then truncate. E[result] = f exactly (up to the bf16
// range), which keeps small optimizer-state updates from vanishing in bf16. ±Inf survive the addition as they
// are; a NaN is first made the canonical quiet NaN (a payload such as CUDA's 0x7FFFFFFF would carry into the
// sign bit). The NaN test is a float compare-and-select: an integer test here doubled the CPU loop's cost.
DL_HD uint16_t f32_to_bf16_sr(float f, uint32_t random16) {
  const uint32_t u = f32_bits(f == f ? f : bits_f32(0x7FC00000u));
  return uint16_t((u + (random16 & 0xFFFFu)) >> 16);
}

DL_HD float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// fp16 on the host is converted with integer arithmetic and selects rather than _Float16: GCC does not vectorise
// _Float16 conversions without AVX512-FP16, and these loops must vectorise. Both round exactly as torch.half().
DL_HD float f16_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = uint32_t(h & 0x7FFFu);                         // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;                  // rebias the exponent by 127 − 15
  const uint32_t inf_nan = (em << 13) | 0x7F800000u;                 // exponent 31: Inf / NaN (payload kept)
  const uint32_t subnormal = f32_bits(float(int32_t(em)) * 5.9604644775390625e-08f);  // em · 2⁻²⁴, exact
  uint32_t out = em >= 0x7C00u ? inf_nan : normal;
  out = em < 0x0400u ? subnormal : out;
  return bits_f32(out | sign);
#endif
}

DL_HD uint16_t f32_to_f16(float f) {  // round to nearest even
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal range: rebias, then round the 13 dropped bits to nearest even (a carry may bump the exponent)
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // below 2⁻¹⁴: adding 0.5f rounds |f| to a multiple of 2⁻²⁴ (ulp of 0.5), which is the fp16 subnormal code
  const uint32_t subnormal = f32_bits(bits_f32(a) + 0.5f) - 0x3F000000u;
  uint32_t h = a < 0x38800000u ? subnormal : normal;
  h = a >= 0x477FF000u ? 0x7C00u : h;  // ≥ 65520 rounds to Inf
  h = a > 0x7F800000u ? 0x7E00u : h;   // NaN
  return uint16_t(h | sign);
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

// Runtime dtype codes and flags → compile-time template arguments.
template <int V> using IntC = std::integral_constant<int, V>;

template <class F> void dispatch_dtype(int code, const char* what, F&& f) {
  switch (code) {
    case kF32: f(IntC<kF32>{}); break;
    case kBF16: f(IntC<kBF16>{}); break;
    case kF16: f(IntC<kF16>{}); break;
    default: throw std::invalid_argument(std::string("dlcore: unsupported dtype code for ") + what);
  }
}

template <class F> void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace dlcore
