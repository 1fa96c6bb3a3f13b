// CUDA C++ forward of conv2d_relu_maxpool2d (the `cuda` backend of dlcore/ops/conv_pool.py, groups = 1): an
// implicit-GEMM convolution on tensor cores (WMMA) with the max-pool, bias and ReLU in its epilogue, the same
// function as kernels/conv_pool.py's fused_forward_kernel:
//   y[n, co, i, j] = relu(max over the pool window (a, e) of z[n, co, i·PS − PP + a, j·PS − PP + e] + b[co])
//   z[n, co, h, w] = Σ_{r, s, ci} x[n, ci, h·S − P + r·D, w·S − P + s·D] · weight[co, ci, r, s]     (no bias)
// and arg = the window offset a·PKW + e of the first maximum (NaN wins, as torch), as a byte.
// A block owns kBM pooled outputs × kBN output channels (8 warps, each 16 × 32 = 1 × 2 WMMA tiles). For every
// window offset it runs the GEMM over k = (r, s, ci) in kBK slices: the A slice gathered from x through its strides
// (im2col never built; padding is a zero, NCHW and channels_last alike) and the B slice from the weight laid out
// as [KH·KW·Cin, Cout], both staged in shared memory; the accumulators go through shared memory once per window
// offset into each thread's running max. The un-pooled activation never reaches global memory.
// fp32 runs as tf32 (m16n16k8), fp16 and bf16 as themselves (m16n16k16); fp32 accumulation throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "cuda/check.h"

namespace py = pybind11;
using namespace nvcuda;

namespace {

constexpr int kBM = 64, kBN = 64, kThreads = 256;  // 8 warps: 4 × 2 of 16 × 32 (128 threads spilled)
constexpr int kPerThread = kBM * kBN / kThreads;  // elements of the block tile each thread folds and stores

struct ConvPoolDims {
  int64_t m, cin, cout, h, w, zh, zw, oh, ow;
  int64_t sxn, sxc, sxh, sxw, syn, syc, syh, syw;
  int64_t sh, sw, ph, pw, dh, dw, kh, kw, psh, psw, pph, ppw, pkh, pkw;
};

// Per storage type: the WMMA operand type and shape, and the conversions.
template <class T> struct Mma;
template <> struct Mma<float> {  // tf32
  using Frag = wmma::precision::tf32;
  static constexpr int kK = 8;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
  template <class F> __device__ static void round(F& f) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
};
template <> struct Mma<__half> {
  using Frag = __half;
  static constexpr int kK = 16;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
  template <class F> __device__ static void round(F&) {}
};
template <> struct Mma<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  template <class F> __device__ static void round(F&) {}
};

template <class T>
__global__ void __launch_bounds__(kThreads, 1)
    conv_pool_kernel(const T* __restrict__ x, const T* __restrict__ wt, const float* __restrict__ bias,
                     T* __restrict__ y, uint8_t* __restrict__ arg, const ConvPoolDims d) {
  constexpr int kBK = Mma<T>::kK;
  constexpr int kLdA = kBK + (sizeof(T) == 4 ? 4 : 8);  // ldm: a multiple of 16 bytes; the pad eases bank conflicts
  constexpr int kLdB = kBN + (sizeof(T) == 4 ? 4 : 8);
  constexpr int kLdC = kBN + 4;
  __shared__ __align__(32) T a_tile[kBM * kLdA];
  __shared__ __align__(32) T b_tile[kBK * kLdB];
  __shared__ __align__(32) float c_tile[kBM * kLdC];
  // The running max and its window offset, element q = tid + t·kThreads owned by one thread (in registers they
  // went to local memory: 128 bytes of stack per thread)
  __shared__ float best[kBM * kBN];
  __shared__ uint8_t best_k[kBM * kBN];

  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, co0 = int64_t(blockIdx.y) * kBN;
  const int wm = (warp / 2) * 16, wn = (warp % 2) * 32;  // this warp's 16 × 32 part of the block tile

  for (int q = tid; q < kBM * kBN; q += kThreads) best[q] = -INFINITY, best_k[q] = 0;

  for (int64_t a = 0; a < d.pkh; ++a)
    for (int64_t e = 0; e < d.pkw; ++e) {
      wmma::fragment<wmma::accumulator, 16, 16, kBK, float> acc[2];
      for (int v = 0; v < 2; ++v) wmma::fill_fragment(acc[v], 0.0f);
      for (int64_t r = 0; r < d.kh; ++r)
        for (int64_t s = 0; s < d.kw; ++s)
          for (int64_t c0 = 0; c0 < d.cin; c0 += kBK) {
            // A slice: rows = pooled outputs (their window position (a, e)), columns = input channels c0..
            for (int q = tid; q < kBM * kBK; q += kThreads) {
              const int row = q / kBK, col = q % kBK;
              const int64_t m = m0 + row, ci = c0 + col;
              float v = 0.f;
              if (m < d.m && ci < d.cin) {
                const int64_t j = m % d.ow, i = (m / d.ow) % d.oh, n = m / (d.ow * d.oh);
                const int64_t zh = i * d.psh - d.pph + a, zw = j * d.psw - d.ppw + e;
                const int64_t xh = zh * d.sh - d.ph + r * d.dh, xw = zw * d.sw - d.pw + s * d.dw;
                if (zh >= 0 && zh < d.zh && zw >= 0 && zw < d.zw && xh >= 0 && xh < d.h && xw >= 0 && xw < d.w)
                  v = Mma<T>::load(x[n * d.sxn + ci * d.sxc + xh * d.sxh + xw * d.sxw]);
              }
              a_tile[row * kLdA + col] = Mma<T>::store(v);
            }
            // B slice: k = (r, s, c0 + row), columns = output channels
            for (int q = tid; q < kBK * kBN; q += kThreads) {
              const int row = q / kBN, col = q % kBN;
              const int64_t ci = c0 + row, co = co0 + col;
              b_tile[row * kLdB + col] = (ci < d.cin && co < d.cout)
                                             ? wt[((r * d.kw + s) * d.cin + ci) * d.cout + co]
                                             : Mma<T>::store(0.f);
            }
            __syncthreads();
            wmma::fragment<wmma::matrix_a, 16, 16, kBK, typename Mma<T>::Frag, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, kBK, typename Mma<T>::Frag, wmma::row_major> fb[2];
            wmma::load_matrix_sync(fa, a_tile + wm * kLdA, kLdA);
            Mma<T>::round(fa);
            for (int v = 0; v < 2; ++v) {
              wmma::load_matrix_sync(fb[v], b_tile + wn + 16 * v, kLdB);
              Mma<T>::round(fb[v]);
              wmma::mma_sync(acc[v], fa, fb[v], acc[v]);
            }
            __syncthreads();  // the slices are rewritten next
          }
      for (int v = 0; v < 2; ++v)
        wmma::store_matrix_sync(c_tile + wm * kLdC + wn + 16 * v, acc[v], kLdC, wmma::mem_row_major);
      __syncthreads();
      for (int t = 0; t < kPerThread; ++t) {  // fold this window position into the running max (strict >: first)
        const int q = tid + t * kThreads, row = q / kBN, col = q % kBN;
        const int64_t m = m0 + row;
        if (m >= d.m) continue;
        const int64_t j = m % d.ow, i = (m / d.ow) % d.oh;
        const int64_t zh = i * d.psh - d.pph + a, zw = j * d.psw - d.ppw + e;
        if (zh < 0 || zh >= d.zh || zw < 0 || zw >= d.zw) continue;  // the pool's −∞ padding
        const float v = c_tile[row * kLdC + col];
        if (v > best[q] || (isnan(v) && !isnan(best[q]))) best[q] = v, best_k[q] = uint8_t(a * d.pkw + e);
      }
      __syncthreads();  // c_tile is rewritten by the next window position
    }

  for (int t = 0; t < kPerThread; ++t) {  // (each thread reads only the elements it folded: no barrier needed)
    const int q = tid + t * kThreads, row = q / kBN, col = q % kBN;
    const int64_t m = m0 + row, co = co0 + col;
    if (m >= d.m || co >= d.cout) continue;
    const int64_t j = m % d.ow, i = (m / d.ow) % d.oh, n = m / (d.ow * d.oh);
    const float o = best[q] + (bias ? bias[co] : 0.f);
    const int64_t out = n * d.syn + co * d.syc + i * d.syh + j * d.syw;
    y[out] = Mma<T>::store(o > 0.f || isnan(o) ? o : 0.f);
    if (arg) arg[out] = best_k[q];  // null in inference (no backward can follow)
  }
}

void conv_pool_forward(int64_t x, int64_t wt, int64_t bias, int64_t y, int64_t arg, const std::vector<int64_t>& g,
                       int dtype, long long stream) {
  if (g.size() != 31) throw std::invalid_argument("dlcore: conv_pool_forward needs 31 dimensions");
  ConvPoolDims d;
  int64_t* fields[] = {&d.m,   &d.cin, &d.cout, &d.h,   &d.w,   &d.zh,  &d.zw,  &d.oh,  &d.ow,  &d.sxn, &d.sxc,
                       &d.sxh, &d.sxw, &d.syn,  &d.syc, &d.syh, &d.syw, &d.sh,  &d.sw,  &d.ph,  &d.pw,  &d.dh,
                       &d.dw,  &d.kh,  &d.kw,   &d.psh, &d.psw, &d.pph, &d.ppw, &d.pkh, &d.pkw};
  for (size_t k = 0; k < 31; ++k) *fields[k] = g[k];
  if (d.m <= 0 || d.cout <= 0) return;
  if (d.pkh * d.pkw > 256) throw std::invalid_argument("dlcore: pooling windows of more than 256 elements");
  const dim3 grid(unsigned((d.m + kBM - 1) / kBM), unsigned((d.cout + kBN - 1) / kBN));
  if (grid.y > 65535) throw std::invalid_argument("dlcore: too many output channels for one launch");
  const auto* b = reinterpret_cast<const float*>(bias);
  auto* a = reinterpret_cast<uint8_t*>(arg);
  switch (dtype) {
    case dlcore::kF32:
      conv_pool_kernel<float><<<grid, kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(wt), b, reinterpret_cast<float*>(y), a, d);
      break;
    case dlcore::kF16:
      conv_pool_kernel<__half><<<grid, kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const __half*>(x), reinterpret_cast<const __half*>(wt), b, reinterpret_cast<__half*>(y),
          a, d);
      break;
    case dlcore::kBF16:
      conv_pool_kernel<__nv_bfloat16><<<grid, kThreads, 0, as_stream(stream)>>>(
          reinterpret_cast<const __nv_bfloat16*>(x), reinterpret_cast<const __nv_bfloat16*>(wt), b,
          reinterpret_cast<__nv_bfloat16*>(y), a, d);
      break;
    default:
      throw std::invalid_argument("dlcore: conv_pool_forward takes fp32, fp16 or bf16");
  }
  DL_CUDA_CHECK_LAUNCH();
}

}  // namespace

void register_conv_pool(py::module_& m) {
  m.def("conv_pool_forward", &conv_pool_forward,
        "Implicit-GEMM conv + maxpool + bias + ReLU (groups = 1); dims as in dlcore/ops/conv_pool.py cuda_forward",
        py::arg("x"), py::arg("wt"), py::arg("bias"), py::arg("y"), py::arg("arg"), py::arg("dims"),
        py::arg("dtype"), py::arg("stream"));
}
