// CUDA C++ flash attention forward (the `cuda` backend of dlcore/ops/attention.py, fp16 and bf16): the
// FlashAttention-2 algorithm on tensor cores (WMMA m16n16k16, fp32 accumulation), same launcher contract and
// results as the Triton kernel and the CPU twin (bias, key lengths, window/causal, Philox dropout, lse).
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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <string>

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
__global__ void __launch_bounds__(kThreads) flash_forward_kernel(const AttnArgs a) {
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
  const int64_t bh = blockIdx.y, b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.HK);
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

template <class T>
void launch_forward(const AttnArgs& a, cudaStream_t stream) {
  const size_t bytes = smem_bytes(a.Dp, sizeof(T));
  int device = 0, optin = 0;
  DL_CUDA_CHECK(cudaGetDevice(&device));
  DL_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > size_t(optin))
    throw std::invalid_argument("dlcore: CUDA attention with head dim " + std::to_string(a.D) + " needs " +
                                std::to_string(bytes) + " bytes of shared memory; this GPU allows " +
                                std::to_string(optin) + " (use the triton backend)");
  DL_CUDA_CHECK(cudaFuncSetAttribute(flash_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     int(bytes)));
  const dim3 grid(unsigned((a.LQ + kBM - 1) / kBM), unsigned(a.B * a.H));
  flash_forward_kernel<T><<<grid, kThreads, bytes, stream>>>(a);
  DL_CUDA_CHECK_LAUNCH();
}

void attention_forward(int64_t q, int64_t k, int64_t v, int64_t o, int64_t lse, int64_t bias, int64_t klen,
                       int dtype, int64_t B, int64_t H, int64_t HK, int64_t LQ, int64_t LK, int64_t D,
                       std::array<int64_t, 3> sq, std::array<int64_t, 3> sk, std::array<int64_t, 3> sv,
                       std::array<int64_t, 3> so, std::array<int64_t, 4> sb, float scale, int64_t win_l,
                       int64_t win_r, uint64_t seed, uint64_t threshold, float drop_scale, long long stream) {
  if (B * H == 0 || LQ == 0) return;
  if (D < 1 || D > 256) throw std::invalid_argument("dlcore: CUDA attention takes head dims 1..256");
  if (HK < 1 || H % HK) throw std::invalid_argument("dlcore: query heads must be a multiple of key heads");
  if (B * H > 65535) throw std::invalid_argument("dlcore: CUDA attention takes at most 65535 batch × heads");
  AttnArgs a{};
  a.q = reinterpret_cast<const void*>(q), a.k = reinterpret_cast<const void*>(k);
  a.v = reinterpret_cast<const void*>(v), a.bias = reinterpret_cast<const void*>(bias);
  a.o = reinterpret_cast<void*>(o), a.lse = reinterpret_cast<float*>(lse);
  a.klen = reinterpret_cast<const int32_t*>(klen);
  a.B = B, a.H = H, a.HK = HK, a.LQ = LQ, a.LK = LK, a.D = D, a.Dp = (D + 15) / 16 * 16;
  for (int t = 0; t < 3; ++t) a.sq[t] = sq[t], a.sk[t] = sk[t], a.sv[t] = sv[t], a.so[t] = so[t];
  for (int t = 0; t < 4; ++t) a.sb[t] = sb[t];
  a.scale = scale, a.drop_scale = drop_scale, a.win_l = win_l, a.win_r = win_r, a.seed = seed;
  a.threshold = threshold;
  switch (dtype) {
    case dlcore::kF16: launch_forward<__half>(a, as_stream(stream)); break;
    case dlcore::kBF16: launch_forward<__nv_bfloat16>(a, as_stream(stream)); break;
    default: throw std::invalid_argument("dlcore: CUDA attention takes fp16 or bf16");
  }
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
}
