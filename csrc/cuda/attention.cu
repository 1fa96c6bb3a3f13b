// CUDA C++ flash attention (the `cuda` backend of dlcore/ops/attention.py, fp16 and bf16): the FlashAttention-2
// algorithm on tensor cores (WMMA m16n16k16, fp32 accumulation), same launcher contract and results as the Triton
// kernels and the CPU twin (bias, key lengths, window/causal, Philox dropout, lse).
// Forward:
// A block owns kBM = 64 query rows of one (batch, head); its 4 warps own 16 rows each. Per key tile of kBN = 64:
//   S = Q·Kᵀ        each warp: 16 × 64 scores from Q and K tiles in shared memory (K read as a col-major B),
//                   stored to shared memory;
//   softmax         each warp, row by row (2 columns per lane, shuffles for max and sum): scale·log2e, bias,
//                   masks (−∞), online update m ← max(m, rowmax), α = 2^(m_old − m), l ← α·l + Σ 2^(s − m)
//                   (m and l in registers, one copy per lane), dropout on the P that multiplies V, O rows ← α·O;
//   O += P·V        each warp: its 16 rows × Dp, accumulators loaded from / stored to the fp32 O tile in shared
//                   memory (WMMA fragments cannot be rescaled row by row in registers).
// Then O / l goes out in the input dtype and lse = (m + log2 l)·ln 2 (−∞ for a row that sees no key).
// Shared memory (dynamic): Q, K, V tiles [64][Dp + 8] T, S [64][68] fp32, P [64][72] T, O [64][Dp + 4] fp32:
// 640·Dp + 24.6 KB bytes (66 KB at Dp 64, 188 KB at 256: beyond an A100's 163 KB, within an H100's 227 KB).
// Backward, deterministic (no atomics), two kernels as the Triton one; with P = 2^(s·log2e − lse·log2e),
// dPd = dO·Vᵀ, Pd = P∘keep/(1−p), dP = dPd∘keep/(1−p), dS = P∘(dP − Δ) (Δ = rowsum(dO∘O), from the launcher):
//   dkdv kernel, a block per (batch, key head, 64 keys): over the group's query heads and the query tiles that can
//     see its keys, dV += Pdᵀ·dO and dK += dSᵀ·Q (scaled at the end), dbias = dS written where asked;
//   dq kernel, a block per (batch, head, 64 queries): over the key tiles it sees, dQ += dS·K (scaled at the end).
// Both recompute S and dPd with WMMA per 16-row warp slice; dK/dV/dQ accumulate in fp32 shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <string>
#include <type_traits>

#include "common/dtype.h"
#include "common/philox.h"
#include "cuda/check.h"

namespace py = pybind11;
using namespace nvcuda;

namespace {

constexpr int kBM = 64, kBN = 64, kWarps = 4, kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

struct AttnArgs {
  const void *q, *k, *v, *bias;
  void* o;
  float* lse;
  const int32_t* klen;
  int64_t B, H, HK, LQ, LK, D, Dp;
  int64_t sq[3], sk[3], sv[3], so[3], sb[4];
  float scale, drop_scale;
  int64_t win_l, win_r;
  uint64_t seed, threshold;
};

template <class T> struct Conv;
template <> struct Conv<__half> {
  __device__ static float f(__half x) { return __half2float(x); }
  __device__ static __half t(float x) { return __float2half_rn(x); }
};
template <> struct Conv<__nv_bfloat16> {
  __device__ static float f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 t(float x) { return __float2bfloat16_rn(x); }
};

// Leading dimensions (elements): multiples of 16 bytes for WMMA; every buffer starts on a 128-byte boundary.
__host__ __device__ inline int ld_tile(int64_t Dp) { return int(Dp) + 8; }
constexpr int kLdS = kBN + 4, kLdP = kBN + 8;
__host__ __device__ inline int ld_out(int64_t Dp) { return int(Dp) + 4; }

size_t smem_bytes(int64_t Dp, size_t tsize) {
  return size_t(kBM + 2 * kBN) * ld_tile(Dp) * tsize + size_t(kBM) * kLdS * 4 + size_t(kBM) * kLdP * tsize +
         size_t(kBM) * ld_out(Dp) * 4;
}

__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) flash_forward_kernel(const AttnArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t Dp = a.Dp;
  const int ldt = ld_tile(Dp), ldo = ld_out(Dp);
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + kBM * ldt;
  T* vs = ks + kBN * ldt;
  float* ss = reinterpret_cast<float*>(vs + kBN * ldt);
  T* ps = reinterpret_cast<T*>(ss + kBM * kLdS);
  float* os = reinterpret_cast<float*>(ps + kBM * kLdP);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // (head, batch) on grid axes y and z: each may reach 65535, their product past it
  const int64_t h = blockIdx.y, b = blockIdx.z, bh = b * a.H + h, hk = h / (a.H / a.HK);
  const int64_t r0 = int64_t(blockIdx.x) * kBM;
  const T* q = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1];
  const T* k = static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1];
  const T* v = static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1];
  const T* bias = static_cast<const T*>(a.bias);
  const int64_t klen = a.klen ? min(int64_t(a.klen[b]), a.LK) : a.LK;
  const T zero = Conv<T>::t(0.f);

  for (int64_t e = tid; e < kBM * Dp; e += kThreads) {  // Q tile (zero beyond the rows and the head dim), O = 0
    const int64_t r = e / Dp, d = e % Dp, i = r0 + r;
    qs[r * ldt + d] = (i < a.LQ && d < a.D) ? q[i * a.sq[2] + d] : zero;
    os[r * ldo + d] = 0.f;
  }
  float m_row[16], l_row[16];  // this warp's rows: running max (log2 units) and sum, the same in every lane
#pragma unroll
  for (int rr = 0; rr < 16; ++rr) m_row[rr] = -INFINITY, l_row[rr] = 0.f;
  __syncthreads();

  // keys the block's rows can see: [lo, hi)
  const int64_t last_row = min(r0 + kBM, a.LQ) - 1;
  int64_t hi = klen;
  if (a.win_r >= 0) hi = min(hi, last_row + a.win_r + 1);
  const int64_t lo = a.win_l >= 0 ? max(int64_t(0), r0 - a.win_l) : 0;
  const float scale_log2 = a.scale * kLog2e;

  for (int64_t c0 = lo / kBN * kBN; c0 < hi; c0 += kBN) {
    for (int64_t e = tid; e < kBN * Dp; e += kThreads) {
      const int64_t c = e / Dp, d = e % Dp, j = c0 + c;
      const bool ok = j < a.LK && d < a.D;
      ks[c * ldt + d] = ok ? k[j * a.sk[2] + d] : zero;
      vs[c * ldt + d] = ok ? v[j * a.sv[2] + d] : zero;
    }
    __syncthreads();

    {  // S = Q·Kᵀ for this warp's 16 rows
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sacc[kBN / 16];
#pragma unroll
      for (int n = 0; n < kBN / 16; ++n) wmma::fill_fragment(sacc[n], 0.f);
      for (int64_t kk = 0; kk < Dp; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, qs + 16 * warp * ldt + kk, ldt);
#pragma unroll
        for (int n = 0; n < kBN / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // Kᵀ: K's rows are its columns
          wmma::load_matrix_sync(fb, ks + 16 * n * ldt + kk, ldt);
          wmma::mma_sync(sacc[n], fa, fb, sacc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kBN / 16; ++n)
        wmma::store_matrix_sync(ss + 16 * warp * kLdS + 16 * n, sacc[n], kLdS, wmma::mem_row_major);
    }
    __syncwarp();

#pragma unroll
    for (int rr = 0; rr < 16; ++rr) {  // online softmax, one row at a time, two columns per lane
      const int r = 16 * warp + rr;
      const int64_t i = r0 + r;
      float x[2];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int c = lane + 32 * u;
        const int64_t j = c0 + c;
        const bool visible = i < a.LQ && j < klen && (a.win_r < 0 || j <= i + a.win_r) &&
                             (a.win_l < 0 || j >= i - a.win_l);
        float s = ss[r * kLdS + c] * scale_log2;
        if (visible && bias) s += Conv<T>::f(bias[b * a.sb[0] + h * a.sb[1] + i * a.sb[2] + j * a.sb[3]]) * kLog2e;
        x[u] = visible ? s : -INFINITY;
      }
      const float m_new = fmaxf(m_row[rr], warp_max(fmaxf(x[0], x[1])));
      const float shift = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet stays at 0
      const float alpha = exp2f(m_row[rr] - shift);
      const float p0 = exp2f(x[0] - shift), p1 = exp2f(x[1] - shift);
      l_row[rr] = l_row[rr] * alpha + warp_sum(p0 + p1);
      m_row[rr] = m_new;
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int c = lane + 32 * u;
        float p = u == 0 ? p0 : p1;
        if (a.threshold > 0)  // Pd = P∘keep/(1 − p): the sum l above is the undropped one
          p = dlcore::dropout_keep(a.seed, uint32_t(i), uint32_t(c0 + c), uint32_t(bh), a.threshold)
                  ? p * a.drop_scale : 0.f;
        ps[r * kLdP + c] = Conv<T>::t(p);
      }
      if (alpha != 1.f)
        for (int64_t d = lane; d < Dp; d += 32) os[r * ldo + d] *= alpha;
    }
    __syncwarp();

    for (int64_t n = 0; n < Dp; n += 16) {  // O += P·V for this warp's rows
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> oacc;
      wmma::load_matrix_sync(oacc, os + 16 * warp * ldo + n, ldo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fa, ps + 16 * warp * kLdP + kk, kLdP);
        wmma::load_matrix_sync(fb, vs + kk * ldt + n, ldt);
        wmma::mma_sync(oacc, fa, fb, oacc);
      }
      wmma::store_matrix_sync(os + 16 * warp * ldo + n, oacc, ldo, wmma::mem_row_major);
    }
    __syncthreads();  // the K and V tiles are rewritten next
  }

  T* o = static_cast<T*>(a.o) + b * a.so[0] + h * a.so[1];
#pragma unroll
  for (int rr = 0; rr < 16; ++rr) {
    const int r = 16 * warp + rr;
    const int64_t i = r0 + r;
    if (i >= a.LQ) continue;
    const float l = l_row[rr], inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t d = lane; d < a.D; d += 32) o[i * a.so[2] + d] = Conv<T>::t(os[r * ldo + d] * inv);
    if (lane == 0) a.lse[bh * a.LQ + i] = l > 0.f ? (m_row[rr] + log2f(l)) * kLn2 : -INFINITY;
  }
}

struct BackArgs {
  AttnArgs f;  // q, k, v, bias, sizes, strides, scale, window, dropout (o and lse unused)
  const void* dout;
  const float *lse, *delta;
  void *dq, *dk, *dv;
  float* dbias;  // [B, H, LQ, LK] fp32 or null
  int64_t sdo[3];
};

// Rows [row0, row0 + 64) of a [rows, D] slice (row stride rs) into a [64][ldt] tile, zero beyond `rows` and D.
template <class T>
__device__ void load_tile(T* dst, int ldt, const T* src, int64_t rs, int64_t row0, int64_t rows, int64_t D,
                          int64_t Dp) {
  const T zero = Conv<T>::t(0.f);
  for (int64_t e = threadIdx.x; e < 64 * Dp; e += kThreads) {
    const int64_t r = e / Dp, d = e % Dp, i = row0 + r;
    dst[r * ldt + d] = (i < rows && d < D) ? src[i * rs + d] : zero;
  }
}

// C[16 rows of this warp][64] = A[16 rows][Dp] · B[64 rows][Dp]ᵀ (B's rows read as the columns of a col-major B)
template <class T>
__device__ void warp_abt(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int64_t Dp) {
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
  for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.f);
  for (int64_t kk = 0; kk < Dp; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, A + 16 * warp * lda + kk, lda);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, B + 16 * n * ldb + kk, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
#pragma unroll
  for (int n = 0; n < 4; ++n) wmma::store_matrix_sync(C + 16 * warp * ldc + 16 * n, acc[n], ldc, wmma::mem_row_major);
}

// C[16 rows of this warp][Dp] += A[16 rows][64] · B[64][Dp]; A_LAYOUT col_major reads A as the transpose of a
// row-major [64][lda] tile (Pdᵀ, dSᵀ).
template <class T, class ALayout>
__device__ void warp_acc(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int64_t Dp) {
  const int warp = threadIdx.x / 32;
  for (int64_t n = 0; n < Dp; n += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, C + 16 * warp * ldc + n, ldc, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < 64; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa;
      if constexpr (std::is_same_v<ALayout, wmma::row_major>)
        wmma::load_matrix_sync(fa, A + 16 * warp * lda + kk, lda);
      else
        wmma::load_matrix_sync(fa, A + kk * lda + 16 * warp, lda);
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, B + kk * ldb + n, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(C + 16 * warp * ldc + n, acc, ldc, wmma::mem_row_major);
  }
}

// For this warp's 16 query rows of a (query tile r0, key tile c0) pair: from S (raw Q·Kᵀ) and dPd (dO·Vᵀ) in
// fp32, write dS (T) and, when pd is not null, Pd (T); dbias gets dS (fp32) where asked.
template <class T>
__device__ void probs_and_grads(const BackArgs& g, int64_t b, int64_t h, int64_t r0, int64_t c0, int64_t klen,
                                const float* S, const float* dPd, const float* lse_t, const float* delta_t,
                                T* pd, T* ds) {
  const AttnArgs& a = g.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* bias = static_cast<const T*>(a.bias);
  const float scale_log2 = a.scale * kLog2e;
  const int64_t bh = b * a.H + h;
  for (int rr = 0; rr < 16; ++rr) {
    const int r = 16 * warp + rr;
    const int64_t i = r0 + r;
    const float lse2 = lse_t[r] * kLog2e, delta = delta_t[r];
    for (int c = lane; c < kBN; c += 32) {
      const int64_t j = c0 + c;
      const bool visible = i < a.LQ && j < klen && (a.win_r < 0 || j <= i + a.win_r) &&
                           (a.win_l < 0 || j >= i - a.win_l) && lse2 != -INFINITY;
      float p = 0.f, dp = 0.f;
      if (visible) {
        float s = S[r * kLdS + c] * scale_log2;
        if (bias) s += Conv<T>::f(bias[b * a.sb[0] + h * a.sb[1] + i * a.sb[2] + j * a.sb[3]]) * kLog2e;
        p = exp2f(s - lse2);
        dp = dPd[r * kLdS + c];
      }
      float pdrop = p;
      if (a.threshold > 0) {
        const bool keep = dlcore::dropout_keep(a.seed, uint32_t(i), uint32_t(j), uint32_t(bh), a.threshold);
        pdrop = keep ? p * a.drop_scale : 0.f;
        dp = keep ? dp * a.drop_scale : 0.f;
      }
      const float dsv = p * (dp - delta);
      ds[r * kLdP + c] = Conv<T>::t(dsv);
      if (pd) pd[r * kLdP + c] = Conv<T>::t(pdrop);
      if (g.dbias && visible) g.dbias[((bh * a.LQ) + i) * a.LK + j] = dsv;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) flash_dkdv_kernel(const BackArgs g) {
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnArgs& a = g.f;
  const int64_t Dp = a.Dp;
  const int ldt = ld_tile(Dp), ldo = ld_out(Dp);
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = ks + kBN * ldt;
  T* qs = vs + kBN * ldt;
  T* dos = qs + kBM * ldt;
  float* S = reinterpret_cast<float*>(dos + kBM * ldt);
  float* dPd = S + kBM * kLdS;
  T* pd = reinterpret_cast<T*>(dPd + kBM * kLdS);
  T* ds = pd + kBM * kLdP;
  float* dk_acc = reinterpret_cast<float*>(ds + kBM * kLdP);
  float* dv_acc = dk_acc + kBN * ldo;
  float* lse_t = dv_acc + kBN * ldo;
  float* delta_t = lse_t + kBM;

  const int tid = threadIdx.x;
  const int64_t hk = blockIdx.y, b = blockIdx.z, group = a.H / a.HK;  // grid (key blocks, HK, B)
  const int64_t c0 = int64_t(blockIdx.x) * kBN;
  const int64_t klen = a.klen ? min(int64_t(a.klen[b]), a.LK) : a.LK;
  load_tile(ks, ldt, static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1], a.sk[2], c0, a.LK, a.D, Dp);
  load_tile(vs, ldt, static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1], a.sv[2], c0, a.LK, a.D, Dp);
  for (int64_t e = tid; e < kBN * Dp; e += kThreads) dk_acc[(e / Dp) * ldo + e % Dp] = 0.f,
                                                     dv_acc[(e / Dp) * ldo + e % Dp] = 0.f;
  // query rows that can see keys [c0, c0 + 64): i - win_r <= j (i >= c0 - win_r) and i - win_l <= c0 + 63
  int64_t q_lo = 0, q_hi = a.LQ;
  if (a.win_r >= 0) q_lo = max(int64_t(0), c0 - a.win_r);
  if (a.win_l >= 0) q_hi = min(a.LQ, c0 + kBN - 1 + a.win_l + 1);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = b * a.H + h;
    for (int64_t r0 = q_lo / kBM * kBM; r0 < q_hi && c0 < klen; r0 += kBM) {
      __syncthreads();  // the previous pair's tiles are still being read
      load_tile(qs, ldt, static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1], a.sq[2], r0, a.LQ, a.D, Dp);
      load_tile(dos, ldt, static_cast<const T*>(g.dout) + b * g.sdo[0] + h * g.sdo[1], g.sdo[2], r0, a.LQ, a.D,
                Dp);
      for (int r = tid; r < kBM; r += kThreads) {
        const int64_t i = r0 + r;
        lse_t[r] = i < a.LQ ? g.lse[bh * a.LQ + i] : -INFINITY;
        delta_t[r] = i < a.LQ ? g.delta[bh * a.LQ + i] : 0.f;
      }
      __syncthreads();
      warp_abt<T>(S, kLdS, qs, ldt, ks, ldt, Dp);     // S = Q·Kᵀ
      warp_abt<T>(dPd, kLdS, dos, ldt, vs, ldt, Dp);  // dPd = dO·Vᵀ
      __syncwarp();
      probs_and_grads<T>(g, b, h, r0, c0, klen, S, dPd, lse_t, delta_t, pd, ds);
      __syncthreads();  // Pd and dS come from every warp's rows; each warp now takes 16 keys
      warp_acc<T, wmma::col_major>(dv_acc, ldo, pd, kLdP, dos, ldt, Dp);  // dV += Pdᵀ·dO
      warp_acc<T, wmma::col_major>(dk_acc, ldo, ds, kLdP, qs, ldt, Dp);   // dK += dSᵀ·Q
    }
  }
  __syncthreads();
  T* dk = static_cast<T*>(g.dk) + (b * a.HK + hk) * a.LK * a.D;  // dk/dv: contiguous [B, HK, LK, D]
  T* dv = static_cast<T*>(g.dv) + (b * a.HK + hk) * a.LK * a.D;
  for (int64_t e = tid; e < kBN * a.D; e += kThreads) {
    const int64_t c = e / a.D, d = e % a.D, j = c0 + c;
    if (j >= a.LK) continue;
    dk[j * a.D + d] = Conv<T>::t(dk_acc[c * ldo + d] * a.scale);
    dv[j * a.D + d] = Conv<T>::t(dv_acc[c * ldo + d]);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) flash_dq_kernel(const BackArgs g) {
  extern __shared__ __align__(128) unsigned char smem[];
  const AttnArgs& a = g.f;
  const int64_t Dp = a.Dp;
  const int ldt = ld_tile(Dp), ldo = ld_out(Dp);
  T* qs = reinterpret_cast<T*>(smem);
  T* dos = qs + kBM * ldt;
  T* ks = dos + kBM * ldt;
  T* vs = ks + kBN * ldt;
  float* S = reinterpret_cast<float*>(vs + kBN * ldt);
  float* dPd = S + kBM * kLdS;
  T* ds = reinterpret_cast<T*>(dPd + kBM * kLdS);
  float* dq_acc = reinterpret_cast<float*>(ds + kBM * kLdP);
  float* lse_t = dq_acc + kBM * ldo;
  float* delta_t = lse_t + kBM;

  const int tid = threadIdx.x;
  // (head, batch) on grid axes y and z: each may reach 65535, their product past it
  const int64_t h = blockIdx.y, b = blockIdx.z, bh = b * a.H + h, hk = h / (a.H / a.HK);
  const int64_t r0 = int64_t(blockIdx.x) * kBM;
  const int64_t klen = a.klen ? min(int64_t(a.klen[b]), a.LK) : a.LK;
  load_tile(qs, ldt, static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1], a.sq[2], r0, a.LQ, a.D, Dp);
  load_tile(dos, ldt, static_cast<const T*>(g.dout) + b * g.sdo[0] + h * g.sdo[1], g.sdo[2], r0, a.LQ, a.D, Dp);
  for (int64_t e = tid; e < kBM * Dp; e += kThreads) dq_acc[(e / Dp) * ldo + e % Dp] = 0.f;
  for (int r = tid; r < kBM; r += kThreads) {
    const int64_t i = r0 + r;
    lse_t[r] = i < a.LQ ? g.lse[bh * a.LQ + i] : -INFINITY;
    delta_t[r] = i < a.LQ ? g.delta[bh * a.LQ + i] : 0.f;
  }
  const int64_t last_row = min(r0 + kBM, a.LQ) - 1;
  int64_t hi = klen;
  if (a.win_r >= 0) hi = min(hi, last_row + a.win_r + 1);
  const int64_t lo = a.win_l >= 0 ? max(int64_t(0), r0 - a.win_l) : 0;
  for (int64_t c0 = lo / kBN * kBN; c0 < hi; c0 += kBN) {
    __syncthreads();
    load_tile(ks, ldt, static_cast<const T*>(a.k) + b * a.sk[0] + hk * a.sk[1], a.sk[2], c0, a.LK, a.D, Dp);
    load_tile(vs, ldt, static_cast<const T*>(a.v) + b * a.sv[0] + hk * a.sv[1], a.sv[2], c0, a.LK, a.D, Dp);
    __syncthreads();
    warp_abt<T>(S, kLdS, qs, ldt, ks, ldt, Dp);
    warp_abt<T>(dPd, kLdS, dos, ldt, vs, ldt, Dp);
    __syncwarp();
    probs_and_grads<T>(g, b, h, r0, c0, klen, S, dPd, lse_t, delta_t, nullptr, ds);
    __syncwarp();  // this warp's dS rows are all it multiplies
    warp_acc<T, wmma::row_major>(dq_acc, ldo, ds, kLdP, ks, ldt, Dp);  // dQ += dS·K
  }
  __syncthreads();
  T* dq = static_cast<T*>(g.dq) + (b * a.H + h) * a.LQ * a.D;  // dq: contiguous [B, H, LQ, D]
  for (int64_t e = tid; e < kBM * a.D; e += kThreads) {
    const int64_t r = e / a.D, d = e % a.D, i = r0 + r;
    if (i < a.LQ) dq[i * a.D + d] = Conv<T>::t(dq_acc[r * ldo + d] * a.scale);
  }
}

size_t dkdv_smem_bytes(int64_t Dp, size_t tsize) {
  return size_t(2 * kBN + 2 * kBM) * ld_tile(Dp) * tsize + size_t(2 * kBM) * kLdS * 4 +
         size_t(2 * kBM) * kLdP * tsize + size_t(2 * kBN) * ld_out(Dp) * 4 + 2 * kBM * 4;
}

size_t dq_smem_bytes(int64_t Dp, size_t tsize) {
  return size_t(2 * kBN + 2 * kBM) * ld_tile(Dp) * tsize + size_t(2 * kBM) * kLdS * 4 + size_t(kBM) * kLdP * tsize +
         size_t(kBM) * ld_out(Dp) * 4 + 2 * kBM * 4;
}

// Dynamic shared memory for `kernel`, or a clear error naming the head dim when the GPU has too little.
template <class K>
void allow_smem(K kernel, size_t bytes, int64_t D) {
  int device = 0, optin = 0;
  DL_CUDA_CHECK(cudaGetDevice(&device));
  DL_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > size_t(optin))
    throw std::invalid_argument("dlcore: CUDA attention with head dim " + std::to_string(D) + " needs " +
                                std::to_string(bytes) + " bytes of shared memory; this GPU allows " +
                                std::to_string(optin) + " (use the triton backend)");
  DL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

template <class T>
void launch_backward(const BackArgs& g, cudaStream_t stream) {
  const AttnArgs& a = g.f;
  const size_t kv_bytes = dkdv_smem_bytes(a.Dp, sizeof(T)), q_bytes = dq_smem_bytes(a.Dp, sizeof(T));
  allow_smem(flash_dkdv_kernel<T>, kv_bytes, a.D);
  allow_smem(flash_dq_kernel<T>, q_bytes, a.D);
  flash_dkdv_kernel<T><<<dim3(unsigned((a.LK + kBN - 1) / kBN), unsigned(a.HK), unsigned(a.B)), kThreads,
                         kv_bytes, stream>>>(g);
  DL_CUDA_CHECK_LAUNCH();
  flash_dq_kernel<T><<<dim3(unsigned((a.LQ + kBM - 1) / kBM), unsigned(a.H), unsigned(a.B)), kThreads, q_bytes,
                       stream>>>(g);
  DL_CUDA_CHECK_LAUNCH();
}

template <class T>
void launch_forward(const AttnArgs& a, cudaStream_t stream) {
  const size_t bytes = smem_bytes(a.Dp, sizeof(T));
  allow_smem(flash_forward_kernel<T>, bytes, a.D);
  const dim3 grid(unsigned((a.LQ + kBM - 1) / kBM), unsigned(a.H), unsigned(a.B));
  flash_forward_kernel<T><<<grid, kThreads, bytes, stream>>>(a);
  DL_CUDA_CHECK_LAUNCH();
}

using S3 = std::array<int64_t, 3>;
using S4 = std::array<int64_t, 4>;

AttnArgs make_args(int64_t q, int64_t k, int64_t v, int64_t bias, int64_t klen, int64_t B, int64_t H, int64_t HK,
                   int64_t LQ, int64_t LK, int64_t D, S3 sq, S3 sk, S3 sv, S4 sb, float scale, int64_t win_l,
                   int64_t win_r, uint64_t seed, uint64_t threshold, float drop_scale) {
  if (D < 1 || D > 256) throw std::invalid_argument("dlcore: CUDA attention takes head dims 1..256");
  if (HK < 1 || H % HK) throw std::invalid_argument("dlcore: query heads must be a multiple of key heads");
  if (B > 65535 || H > 65535)  // grid axes z and y
    throw std::invalid_argument("dlcore: CUDA attention takes at most 65535 sequences and 65535 heads per call");
  AttnArgs a{};
  a.q = reinterpret_cast<const void*>(q), a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v), a.bias = reinterpret_cast<const void*>(bias);
  a.klen = reinterpret_cast<const int32_t*>(klen);
  a.B = B, a.H = H, a.HK = HK, a.LQ = LQ, a.LK = LK, a.D = D, a.Dp = (D + 15) / 16 * 16;
  for (int t = 0; t < 3; ++t) a.sq[t] = sq[t], a.sk[t] = sk[t], a.sv[t] = sv[t];
  for (int t = 0; t < 4; ++t) a.sb[t] = sb[t];
  a.scale = scale, a.drop_scale = drop_scale, a.win_l = win_l, a.win_r = win_r, a.seed = seed;
  a.threshold = threshold;
  return a;
}

template <class F> void dispatch_half(int dtype, F&& f) {
  switch (dtype) {
    case dlcore::kF16: f(__half{}); break;
    case dlcore::kBF16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("dlcore: CUDA attention takes fp16 or bf16");
  }
}

void attention_forward(int64_t q, int64_t k, int64_t v, int64_t o, int64_t lse, int64_t bias, int64_t klen,
                       int dtype, int64_t B, int64_t H, int64_t HK, int64_t LQ, int64_t LK, int64_t D, S3 sq, S3 sk,
                       S3 sv, S3 so, S4 sb, float scale, int64_t win_l, int64_t win_r, uint64_t seed,
                       uint64_t threshold, float drop_scale, long long stream) {
  if (B * H == 0 || LQ == 0) return;
  AttnArgs a = make_args(q, k, v, bias, klen, B, H, HK, LQ, LK, D, sq, sk, sv, sb, scale, win_l, win_r, seed,
                         threshold, drop_scale);
  a.o = reinterpret_cast<void*>(o), a.lse = reinterpret_cast<float*>(lse);
  for (int t = 0; t < 3; ++t) a.so[t] = so[t];
  dispatch_half(dtype, [&](auto t) { launch_forward<decltype(t)>(a, as_stream(stream)); });
}

// dq [B, H, LQ, D], dk and dv [B, HK, LK, D] contiguous; dbias fp32 [B, H, LQ, LK] zeroed by the caller, or 0.
void attention_backward(int64_t dout, S3 sdo, int64_t q, int64_t k, int64_t v, int64_t lse, int64_t delta,
                        int64_t dq, int64_t dk, int64_t dv, int64_t dbias, int64_t bias, int64_t klen, int dtype,
                        int64_t B, int64_t H, int64_t HK, int64_t LQ, int64_t LK, int64_t D, S3 sq, S3 sk, S3 sv,
                        S4 sb, float scale, int64_t win_l, int64_t win_r, uint64_t seed, uint64_t threshold,
                        float drop_scale, long long stream) {
  if (B * H == 0 || LQ == 0 || LK == 0) return;
  BackArgs g{};
  g.f = make_args(q, k, v, bias, klen, B, H, HK, LQ, LK, D, sq, sk, sv, sb, scale, win_l, win_r, seed, threshold,
                  drop_scale);
  g.dout = reinterpret_cast<const void*>(dout);
  g.lse = reinterpret_cast<const float*>(lse), g.delta = reinterpret_cast<const float*>(delta);
  g.dq = reinterpret_cast<void*>(dq), g.dk = reinterpret_cast<void*>(dk), g.dv = reinterpret_cast<void*>(dv);
  g.dbias = reinterpret_cast<float*>(dbias);
  for (int t = 0; t < 3; ++t) g.sdo[t] = sdo[t];
  dispatch_half(dtype, [&](auto t) { launch_backward<decltype(t)>(g, as_stream(stream)); });
}

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_forward", &attention_forward,
        "Flash attention forward on tensor cores (device addresses; the launcher contract of "
        "dlcore/ops/attention.py)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"), py::arg("bias"), py::arg("klen"),
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("HK"), py::arg("LQ"), py::arg("LK"), py::arg("D"),
        py::arg("sq"), py::arg("sk"), py::arg("sv"), py::arg("so"), py::arg("sb"), py::arg("scale"),
        py::arg("win_l"), py::arg("win_r"), py::arg("seed"), py::arg("threshold"), py::arg("drop_scale"),
        py::arg("stream"));
  m.def("attention_backward", &attention_backward,
        "Flash attention backward on tensor cores: dK/dV over key tiles, then dQ over query tiles (deterministic)",
        py::arg("dout"), py::arg("sdo"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lse"), py::arg("delta"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("dbias"), py::arg("bias"), py::arg("klen"),
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("HK"), py::arg("LQ"), py::arg("LK"), py::arg("D"),
        py::arg("sq"), py::arg("sk"), py::arg("sv"), py::arg("sb"), py::arg("scale"), py::arg("win_l"),
        py::arg("win_r"), py::arg("seed"), py::arg("threshold"), py::arg("drop_scale"), py::arg("stream"));
}
