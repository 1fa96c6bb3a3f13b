// Adam / AdamW as one per-element functor, shared by the CPU twin (csrc/cpu/adam.cpp) and the CUDA kernel
// (csrc/cuda/adam.cu). The Triton kernel (kernels/adam.py) and the reference (dlcore/ops/adam.py) compute the
// same function in the same order.
//
//   g  ← ±g / grad_scale                        (maximize flips the sign; GradScaler's scale undone here)
//   g  ← g + wd·θ                               (Adam: L2 penalty folded into the gradient)
//   θ  ← θ·(1 − lr·wd)                          (AdamW: decoupled decay)
//   m  ← m + (1 − β1)(g − m)                    (= β1 m + (1 − β1) g, written as torch's lerp)
//   v  ← β2 v + (1 − β2) g²
//   v̂  ← max(v̂, v) if amsgrad else v
//   θ  ← θ − (lr / (1 − β1ᵗ)) · m / (√v̂ / √(1 − β2ᵗ) + ε)
//      = θ − α · m / (√v̂ + ε̂)  with α = lr·√(1 − β2ᵗ) / (1 − β1ᵗ), ε̂ = ε·√(1 − β2ᵗ) from the host:
//        one division and one square root per element instead of two divisions (the CPU loop is ALU-bound)
//
// The multi-tensor tables (built once per parameter set by dlcore/_multi_tensor.py):
//   ptrs   int64 [n_tensors, 6]  addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master (0 = none)
//   numels int64 [n_tensors]
//   scal   fp32  [n_tensors, 4]  lr, α = lr·√(1 − β2ᵗ)/(1 − β1ᵗ), ε̂ = ε·√(1 − β2ᵗ), t
//   chunks int64 [n_chunks, 2]   (tensor index, first element) of each chunk of chunk_size elements
#pragma once
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dtype.h"

namespace dlcore {

enum AdamSlot : int { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kMaster = 5, kSlots = 6 };
constexpr int kScalars = 4;

struct AdamHyper {
  // 1 − β is computed on the host in double: in fp32, 1 − 0.999f is off by 1.3e-5 relative (0.999f ≠ 0.999).
  float beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay;
  bool decoupled, maximize;
  uint32_t seed;
};

// Per-tensor coefficients, derived once per chunk from the group's hyper-parameters and the tensor's scalars.
struct AdamCoef {
  float grad_mult, l2, decay, one_minus_beta1, beta2, one_minus_beta2, alpha, eps_hat;
  uint32_t key;    // stochastic-rounding stream of this (seed, tensor, step)
  uint32_t first;  // index in the tensor of the chunk's first element (the hash counts whole-tensor indices)
};

DL_HD AdamCoef adam_coef(const AdamHyper& h, const float* scal, int64_t tensor, int64_t first, float grad_scale) {
  AdamCoef c;
  const float lr = scal[0];
  c.grad_mult = (h.maximize ? -1.0f : 1.0f) / grad_scale;
  c.l2 = h.decoupled ? 0.0f : h.weight_decay;
  c.decay = h.decoupled ? 1.0f - lr * h.weight_decay : 1.0f;
  c.one_minus_beta1 = h.one_minus_beta1;
  c.beta2 = h.beta2;
  c.one_minus_beta2 = h.one_minus_beta2;
  c.alpha = scal[1];
  c.eps_hat = scal[2];
  c.key = mix32(h.seed ^ mix32(uint32_t(tensor) * 0x9E3779B9u + uint32_t(scal[3])));
  c.first = uint32_t(first);
  return c;
}

template <int PD, int SD, bool AMS, bool MASTER>
struct AdamElement {
  using PT = typename Storage<PD>::T;
  using ST = typename Storage<SD>::T;
  PT* __restrict__ p;
  const PT* __restrict__ g;
  ST* __restrict__ m;
  ST* __restrict__ v;
  ST* __restrict__ vmax;
  float* __restrict__ master;

  // i: offset within the chunk (the pointers start at the chunk). 32-bit indices keep the CPU loop's vectors
  // and the GPU's address arithmetic narrow.
  DL_HD void operator()(int i, const AdamCoef& c) const {
    float theta = MASTER ? master[i] : Storage<PD>::load(p[i]);
    float grad = Storage<PD>::load(g[i]) * c.grad_mult;
    grad += c.l2 * theta;
    theta *= c.decay;
    float mf = Storage<SD>::load(m[i]);
    mf += c.one_minus_beta1 * (grad - mf);
    float vf = c.beta2 * Storage<SD>::load(v[i]) + c.one_minus_beta2 * grad * grad;
    float vhat = vf;
    if (AMS) {  // a select, not fmaxf: it vectorises, and a NaN in v propagates as in torch.maximum
      const float old_max = Storage<SD>::load(vmax[i]);
      vhat = old_max > vf ? old_max : vf;
    }
    theta -= c.alpha * (mf / (sqrtf(vhat) + c.eps_hat));
    // One hash per element gives both 16-bit rounding streams (low half: exp_avg, high half: exp_avg_sq).
    const uint32_t r = mix32((c.first + uint32_t(i)) ^ c.key);
    m[i] = Storage<SD>::store_sr(mf, r);
    v[i] = Storage<SD>::store_sr(vf, r >> 16);
    if (AMS) vmax[i] = Storage<SD>::store_sr(vhat, r >> 16);
    if (MASTER) master[i] = theta;
    p[i] = Storage<PD>::store(theta);
  }

#if !defined(__CUDACC__)
  // Touch elements [i, i + n) of every stream ahead of use (CPU): with stochastic rounding the loop is compute-
  // heavy enough that the hardware prefetchers fall behind and memory time adds to compute time.
  void prefetch(int i, int n) const {
    auto lines = [](const void* base, int64_t first, int64_t bytes, auto rw) {
      if (!base) return;
      const char* c = static_cast<const char*>(base) + first;
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, decltype(rw)::value, 3);
    };
    lines(p, int64_t(i) * sizeof(PT), int64_t(n) * sizeof(PT), std::true_type{});
    lines(g, int64_t(i) * sizeof(PT), int64_t(n) * sizeof(PT), std::false_type{});
    lines(m, int64_t(i) * sizeof(ST), int64_t(n) * sizeof(ST), std::true_type{});
    lines(v, int64_t(i) * sizeof(ST), int64_t(n) * sizeof(ST), std::true_type{});
    if (AMS) lines(vmax, int64_t(i) * sizeof(ST), int64_t(n) * sizeof(ST), std::true_type{});
    if (MASTER) lines(master, int64_t(i) * 4, int64_t(n) * 4, std::true_type{});
  }
#endif
};

// The functor for one chunk: every pointer of tensor row `row` advanced to element `first` (absent slots stay
// null; the functor never touches them).
template <int PD, int SD, bool AMS, bool MASTER>
DL_HD AdamElement<PD, SD, AMS, MASTER> adam_element(const int64_t* row, int64_t first) {
  using E = AdamElement<PD, SD, AMS, MASTER>;
  auto at = [&](int slot, int64_t bytes) { return row[slot] ? row[slot] + first * bytes : int64_t(0); };
  const int64_t pb = sizeof(typename E::PT), sb = sizeof(typename E::ST);
  return E{reinterpret_cast<typename E::PT*>(at(kParam, pb)), reinterpret_cast<const typename E::PT*>(at(kGrad, pb)),
           reinterpret_cast<typename E::ST*>(at(kExpAvg, sb)), reinterpret_cast<typename E::ST*>(at(kExpAvgSq, sb)),
           reinterpret_cast<typename E::ST*>(at(kMaxExpAvgSq, sb)), reinterpret_cast<float*>(at(kMaster, 4))};
}

// Compile-time variants come from one table (dispatch_dtype / dispatch_bool in dtype.h).

// f is called as f(IntC<PD>, IntC<SD>, bool_constant<AMS>, bool_constant<MASTER>). Master weights exist only for
// bf16/fp16 params, so fp32 + master is never instantiated.
template <class F> void dispatch_adam(int param_dtype, int state_dtype, bool amsgrad, bool master, F&& f) {
  dispatch_dtype(param_dtype, "param", [&](auto pd) {
    dispatch_dtype(state_dtype, "state", [&](auto sd) {
      dispatch_bool(amsgrad, [&](auto ams) {
        dispatch_bool(master, [&](auto mw) {
          if constexpr (std::decay_t<decltype(pd)>::value == kF32 && std::decay_t<decltype(mw)>::value)
            throw std::invalid_argument("dlcore: master weights are for bf16/fp16 params, not fp32");
          else
            f(pd, sd, ams, mw);
        });
      });
    });
  });
}

}  // namespace dlcore
