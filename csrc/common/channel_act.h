// The activations of dlcore's channel-wise kernels (batch_norm_act and the conv epilogue), shared by the CPU twin
// (csrc/cpu/batch_norm.cpp) and the CUDA kernels (csrc/cuda/batch_norm.cu). Codes as in dlcore/ops/batch_norm.py
// ACTIVATIONS. The gradient is read from the output y: y > 0 ⇔ z > 0 for ReLU and LeakyReLU with slope ≥ 0.
#pragma once
#include <stdexcept>

#include "common/dtype.h"

namespace dlcore {

enum ChannelActivation { kActIdentity = 0, kActRelu = 1, kActLeakyRelu = 2 };

// ReLU as `z < 0 ? 0 : z`, not `z > 0 ? z : 0`: a NaN stays NaN, as torch.relu keeps it (LeakyReLU's z·slope does).
template <int ACT>
DL_HD float channel_activate(float z, float slope) {
  if (ACT == kActRelu) return z < 0.f ? 0.f : z;
  if (ACT == kActLeakyRelu) return z > 0.f ? z : z * slope;
  return z;
}

template <int ACT>
DL_HD float channel_activation_grad(float dy, float y, float slope) {
  if (ACT == kActRelu) return y > 0.f ? dy : 0.f;
  if (ACT == kActLeakyRelu) return y > 0.f ? dy : dy * slope;
  return dy;
}

template <class F>
void dispatch_channel_activation(int code, F&& f) {
  switch (code) {
    case kActIdentity: f(IntC<kActIdentity>{}); break;
    case kActRelu: f(IntC<kActRelu>{}); break;
    case kActLeakyRelu: f(IntC<kActLeakyRelu>{}); break;
    default: throw std::invalid_argument("dlcore: unknown activation code");
  }
}

}  // namespace dlcore
