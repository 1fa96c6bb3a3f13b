// CUDA C++ channel-wise kernels: the `cuda` backend of dlcore/ops/batch_norm.py (fused BN + residual + activation)
// and of the conv epilogue in dlcore/ops/conv_relu.py. Same math, layouts and launcher contract as the CPU twin
// (csrc/cpu/batch_norm.cpp) and the Triton kernels (kernels/batch_norm.py); fp32/bf16/fp16 storage, fp32 math.
// A tensor of C channels is [outer, C, inner]; position p = (p / inner, p % inner).
//   Reductions (stats, backward_reduce): a grid of (channel blocks × position splits); a block is
//   kChannelLanes(= 32 for channels_last, 1 for NCHW) channel lanes × (256 / lanes) position lanes, so that
//   neighbouring threads read neighbouring addresses in either layout. Each thread folds its positions (Welford for
//   stats), the block merges across position lanes in shared memory (Chan's formula), and writes one partial per
//   (split, channel); the launcher merges the splits (deterministic: no atomics).
//   Elementwise (apply, backward_apply): a grid-stride loop over elements, channel = (e / inner) % C.
#include <pybind11/pybind11.h>

#include <algorithm>

#include "common/channel_act.h"
#include "cuda/check.h"

namespace py = pybind11;
using namespace dlcore;

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t offset(int64_t p, int64_t c, int64_t channels, int64_t inner) {
  return (p / inner) * channels * inner + c * inner + p % inner;
}

// Chan's merge of (n_b, m_b, M2_b) into (n, m, M2)
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float mean_b, float m2b) {
  const float total = n + nb;
  if (total == 0.f) return;
  const float d = mean_b - mean;
  mean += d * (nb / total);
  m2 += m2b + d * d * (n * nb / total);
  n = total;
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const typename Storage<DT>::T* __restrict__ x, float* __restrict__ pcount,
                 float* __restrict__ pmean, float* __restrict__ pm2, int64_t positions, int64_t channels,
                 int64_t inner, int64_t per_split) {
  __shared__ float sn[kThreads], smean[kThreads], sm2[kThreads];
  const int lanes = blockDim.x, rows = blockDim.y, tid = threadIdx.y * lanes + threadIdx.x;
  const int64_t c = int64_t(blockIdx.x) * lanes + threadIdx.x;
  const int64_t first = int64_t(blockIdx.y) * per_split;
  const int64_t last = min(first + per_split, positions);
  float n = 0.f, mean = 0.f, m2 = 0.f;
  if (c < channels)
#pragma unroll 1
    for (int64_t p = first + threadIdx.y; p < last; p += rows) {  // Welford, one value at a time
      const float v = Storage<DT>::load(x[offset(p, c, channels, inner)]);
      n += 1.f;
      const float d = v - mean;
      mean += d / n;
      m2 += d * (v - mean);
    }
  sn[tid] = n, smean[tid] = mean, sm2[tid] = m2;
  __syncthreads();
  for (int stride = rows / 2; stride > 0; stride /= 2) {  // tree over the position lanes of each channel lane
    if (threadIdx.y < stride) {
      const int other = tid + stride * lanes;
      chan_merge(sn[tid], smean[tid], sm2[tid], sn[other], smean[other], sm2[other]);
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < channels) {
    const int64_t k = int64_t(blockIdx.y) * channels + c;
    pcount[k] = sn[tid], pmean[k] = smean[tid], pm2[k] = sm2[tid];
  }
}

template <int DT, int ACT>
__global__ void __launch_bounds__(kThreads)
    backward_reduce_kernel(const typename Storage<DT>::T* __restrict__ dy, const typename Storage<DT>::T* __restrict__ y,
                           const typename Storage<DT>::T* __restrict__ x, const float* __restrict__ mean,
                           typename Storage<DT>::T* __restrict__ dz, float* __restrict__ ps1, float* __restrict__ ps2,
                           int64_t positions, int64_t channels, int64_t inner, int64_t per_split, float slope) {
  __shared__ float s1s[kThreads], s2s[kThreads];
  const int lanes = blockDim.x, rows = blockDim.y, tid = threadIdx.y * lanes + threadIdx.x;
  const int64_t c = int64_t(blockIdx.x) * lanes + threadIdx.x;
  const int64_t first = int64_t(blockIdx.y) * per_split;
  const int64_t last = min(first + per_split, positions);
  float s1 = 0.f, s2 = 0.f;
  if (c < channels) {
    const float m = x ? mean[c] : 0.f;
#pragma unroll 1
    for (int64_t p = first + threadIdx.y; p < last; p += rows) {
      const int64_t e = offset(p, c, channels, inner);
      const float g = channel_activation_grad<ACT>(Storage<DT>::load(dy[e]), ACT ? Storage<DT>::load(y[e]) : 0.f, slope);
      if (dz) dz[e] = Storage<DT>::store(g);
      s1 += g;
      if (x) s2 += g * (Storage<DT>::load(x[e]) - m);
    }
  }
  s1s[tid] = s1, s2s[tid] = s2;
  __syncthreads();
  for (int stride = rows / 2; stride > 0; stride /= 2) {
    if (threadIdx.y < stride) {
      s1s[tid] += s1s[tid + stride * lanes];
      s2s[tid] += s2s[tid + stride * lanes];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < channels) {
    ps1[int64_t(blockIdx.y) * channels + c] = s1s[tid];
    ps2[int64_t(blockIdx.y) * channels + c] = s2s[tid];
  }
}

template <int DT, int ACT>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const typename Storage<DT>::T* x, const typename Storage<DT>::T* __restrict__ r,
                 const float* __restrict__ scale, const float* __restrict__ shift, typename Storage<DT>::T* y,
                 int64_t n, int64_t channels, int64_t inner, float slope) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (e / inner) % channels;
    float z = Storage<DT>::load(x[e]);  // x and y may alias (in place): read before write, same thread
    if (scale) z *= scale[c];
    if (shift) z += shift[c];
    if (r) z += Storage<DT>::load(r[e]);
    y[e] = Storage<DT>::store(channel_activate<ACT>(z, slope));
  }
}

template <int DT, int ACT>
__global__ void __launch_bounds__(kThreads)
    backward_apply_kernel(const typename Storage<DT>::T* __restrict__ dy, const typename Storage<DT>::T* __restrict__ y,
                          const typename Storage<DT>::T* __restrict__ x, const float* __restrict__ a,
                          const float* __restrict__ b, const float* __restrict__ k,
                          typename Storage<DT>::T* __restrict__ dx, int64_t n, int64_t channels, int64_t inner,
                          float slope) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (e / inner) % channels;
    const float g = channel_activation_grad<ACT>(Storage<DT>::load(dy[e]), ACT ? Storage<DT>::load(y[e]) : 0.f, slope);
    float v = a[c] * g;
    if (b) v += b[c] * Storage<DT>::load(x[e]) + k[c];
    dx[e] = Storage<DT>::store(v);
  }
}

// Reduction launch shape: (channel lanes, position lanes) and the grid (channel blocks, splits).
struct ReduceShape {
  dim3 block, grid;
  int64_t per_split;
};

ReduceShape reduce_shape(int64_t positions, int64_t channels, int64_t inner, int64_t splits) {
  const int lanes = inner == 1 ? 32 : 1;
  const int64_t channel_blocks = (channels + lanes - 1) / lanes;
  const int64_t per_split = (positions + splits - 1) / splits;
  return {dim3(lanes, kThreads / lanes), dim3(unsigned(channel_blocks), unsigned(splits)), per_split};
}

unsigned elementwise_blocks(int64_t n) {
  return unsigned(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(65535) * 8));
}

template <class T>
T* ptr(int64_t addr) {
  return reinterpret_cast<T*>(addr);
}

}  // namespace

void register_batch_norm(py::module_& m) {
  m.def(
      "batch_norm_stats_partials",
      [](int64_t x, int64_t pcount, int64_t pmean, int64_t pm2, int64_t outer, int64_t channels, int64_t inner,
         int64_t splits, int dtype, long long stream) {
        const ReduceShape s = reduce_shape(outer * inner, channels, inner, splits);
        dispatch_dtype(dtype, "x", [&](auto dt) {
          constexpr int DT = decltype(dt)::value;
          stats_kernel<DT><<<s.grid, s.block, 0, as_stream(stream)>>>(
              ptr<const typename Storage<DT>::T>(x), ptr<float>(pcount), ptr<float>(pmean), ptr<float>(pm2),
              outer * inner, channels, inner, s.per_split);
        });
        DL_CUDA_CHECK_LAUNCH();
      },
      "Per-(split, channel) Welford partials (count, mean, M2) of x [outer, C, inner]; outputs [splits, C] fp32");
  m.def(
      "channel_affine_act",
      [](int64_t x, int64_t r, int64_t scale, int64_t shift, int64_t y, int64_t outer, int64_t channels,
         int64_t inner, int act, float slope, int dtype, long long stream) {
        const int64_t n = outer * channels * inner;
        dispatch_dtype(dtype, "x", [&](auto dt) {
          constexpr int DT = decltype(dt)::value;
          using T = typename Storage<DT>::T;
          dispatch_channel_activation(act, [&](auto ac) {
            apply_kernel<DT, decltype(ac)::value><<<elementwise_blocks(n), kThreads, 0, as_stream(stream)>>>(
                ptr<const T>(x), ptr<const T>(r), ptr<const float>(scale), ptr<const float>(shift), ptr<T>(y), n,
                channels, inner, slope);
          });
        });
        DL_CUDA_CHECK_LAUNCH();
      },
      "y = act(scale[c]*x + shift[c] + r); 0 for an absent pointer; y may be x");
  m.def(
      "channel_act_backward_reduce_partials",
      [](int64_t dy, int64_t y, int64_t x, int64_t mean, int64_t dz, int64_t ps1, int64_t ps2, int64_t outer,
         int64_t channels, int64_t inner, int64_t splits, int act, float slope, int dtype, long long stream) {
        const ReduceShape s = reduce_shape(outer * inner, channels, inner, splits);
        dispatch_dtype(dtype, "x", [&](auto dt) {
          constexpr int DT = decltype(dt)::value;
          using T = typename Storage<DT>::T;
          dispatch_channel_activation(act, [&](auto ac) {
            backward_reduce_kernel<DT, decltype(ac)::value><<<s.grid, s.block, 0, as_stream(stream)>>>(
                ptr<const T>(dy), ptr<const T>(y), ptr<const T>(x), ptr<const float>(mean), ptr<T>(dz),
                ptr<float>(ps1), ptr<float>(ps2), outer * inner, channels, inner, s.per_split, slope);
          });
        });
        DL_CUDA_CHECK_LAUNCH();
      },
      "dz = act'(y)*dy (written when dz != 0); per-(split, channel) sums of dz and dz*(x - mean)");
  m.def(
      "channel_act_backward_apply",
      [](int64_t dy, int64_t y, int64_t x, int64_t a, int64_t b, int64_t k, int64_t dx, int64_t outer,
         int64_t channels, int64_t inner, int act, float slope, int dtype, long long stream) {
        const int64_t n = outer * channels * inner;
        dispatch_dtype(dtype, "x", [&](auto dt) {
          constexpr int DT = decltype(dt)::value;
          using T = typename Storage<DT>::T;
          dispatch_channel_activation(act, [&](auto ac) {
            backward_apply_kernel<DT, decltype(ac)::value><<<elementwise_blocks(n), kThreads, 0, as_stream(stream)>>>(
                ptr<const T>(dy), ptr<const T>(y), ptr<const T>(x), ptr<const float>(a), ptr<const float>(b),
                ptr<const float>(k), ptr<T>(dx), n, channels, inner, slope);
          });
        });
        DL_CUDA_CHECK_LAUNCH();
      },
      "dx = a[c]*act'(y)*dy + b[c]*x + k[c] (b = k = 0 when b == 0)");
}
