// Vector math shared by the CPU twins: 16-float GCC vectors (one AVX-512 register here, two AVX2 halves
// elsewhere) and the polynomial exp2 the softmax-like loops use, so that those loops vectorise without libmvec.
#pragma once
#include <cstdint>
#include <cstring>

namespace dlcore {

constexpr int VW = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x for x ≤ 0 (scores minus the running max), 16 lanes at a time: 2^round(x) · Taylor₇(2^f), |f| ≤ ½, relative
// error ≈ 5e-9; -inf and x < -126 give 0. Explicit vectors: GCC auto-vectorises at 256 bits on this CPU.
inline vf exp2v(vf x) {
  const vf lowest = vf{} - 126.0f;
  const vf xc = x < lowest ? lowest : x;
  const vf n = (xc + 12582912.0f) - 12582912.0f;
  const vf f = (xc - n) * kLn2;
  vf p = vf{} + 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);  // 2^n from its exponent bits
  return x < lowest ? vf{} : p * two_n;
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

inline float sum_lanes(vf v) {
  float total = 0.0f;
  for (int l = 0; l < VW; ++l) total += v[l];
  return total;
}

inline float max_lanes(vf v) {
  float m = v[0];
  for (int l = 1; l < VW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// e^x for x ≤ 0 through exp2v
inline vf expv_neg(vf x) { return exp2v(x * kLog2e); }

// tanh(x) = sign(x)·(1 − e^{−2|x|}) / (1 + e^{−2|x|}); the exponent is ≤ 0, so exp2v's range is enough.
inline vf tanhv(vf x) {
  const vf a = x < 0.0f ? -x : x;
  const vf e = expv_neg(-2.0f * a);
  const vf t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// erf(x) by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below fp32's resolution of erf near 1).
inline vf erfv(vf x) {
  const vf a = x < 0.0f ? -x : x;
  const vf t = 1.0f / (1.0f + 0.3275911f * a);
  vf p = vf{} + 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const vf y = 1.0f - p * t * expv_neg(-a * a);
  return x < 0.0f ? -y : y;
}

}  // namespace dlcore
