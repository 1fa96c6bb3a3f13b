"""conv2d_relu: y = relu(conv2d(x, w) + b), forward and backward (the first half of issue 3's fused op; the
maxpool epilogue, Triton and CUDA C++ backends are still to come and are reported unavailable, never faked).

Backends
  reference  F.relu(F.conv2d(x, w, b, ...)); backward by the same formulas in plain PyTorch. Every dtype.
  cpu        torch's convolution (oneDNN) without its bias, then the C++ epilogue (csrc/cpu/bias_relu.cpp): bias
             and ReLU in place, one pass; backward: one pass for dz = dy·[y > 0] and db = Σ dz, then torch's
             convolution_backward for dx and dw. fp32, NCHW and channels_last.
Backward needs only the output y (y > 0 ⇔ z + b > 0), never the pre-activation.

Autograd: one custom op `dlcore::conv2d_relu` (+ fake) with a registered backward that is itself the custom op
`dlcore::conv2d_relu_backward` (+ fake), so torch.compile(fullgraph=True) sees single nodes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dlcore import _dispatch, _ext

FORWARD, BACKWARD = "conv2d_relu", "conv2d_relu_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=())  # no GPU kernel yet: CUDA tensors run the reference
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


# ---------------------------------------------------------------------------------------------------- reference
@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(x, weight, bias, stride, padding, dilation, groups):
    return F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups))


def _conv_grads(dz, x, weight, stride, padding, dilation, groups, mask):
    """(dx, dw) of the bias-free convolution, given dz = ∂L/∂(conv output): torch's convolution_backward."""
    dx, dw, _ = torch.ops.aten.convolution_backward(dz, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                    groups, [mask[0], mask[1], False])
    return dx, dw


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask):
    dz = grad_y * (y > 0)  # ReLU'(z + b) read from the output
    db = dz.sum((0, 2, 3)) if has_bias and mask[2] else None
    return (*_conv_grads(dz, x, weight, stride, padding, dilation, groups, mask), db)


# ---------------------------------------------------------------------------------------------------- cpu (C++)
def _planes(y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """y made dense in its own layout, and its (outer, channels, inner) shape for the C++ loops."""
    n, c, h, w = y.shape
    if y.is_contiguous():
        return y, (n, c, h * w)
    if y.is_contiguous(memory_format=torch.channels_last):
        return y, (n * h * w, c, 1)
    return y.contiguous(), (n, c, h * w)


@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=(torch.float32,), available=_ext.cpu_unavailable)
def cpu_forward(x, weight, bias, stride, padding, dilation, groups):
    y, shape = _planes(F.conv2d(x, weight, None, stride, padding, dilation, groups))
    if bias is not None:
        bias = bias.contiguous()
    _ext.cpu.bias_relu_forward(y.data_ptr(), 0 if bias is None else bias.data_ptr(), *shape)
    return y


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=(torch.float32,), available=_ext.cpu_unavailable)
def cpu_backward(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask):
    y, shape = _planes(y)
    fmt = torch.channels_last if shape[2] == 1 and y.shape[1] > 1 else torch.contiguous_format
    grad_y = grad_y.contiguous(memory_format=fmt)
    dz = torch.empty_like(y, memory_format=fmt)
    db = torch.empty(y.shape[1], dtype=y.dtype) if has_bias and mask[2] else None
    _ext.cpu.bias_relu_backward(grad_y.data_ptr(), y.data_ptr(), dz.data_ptr(), 0 if db is None else db.data_ptr(),
                                *shape)
    return (*_conv_grads(dz, x, weight, stride, padding, dilation, groups, mask), db)


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dlcore::conv2d_relu", mutates_args=())
def conv2d_relu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    _, launch = _dispatch.select(FORWARD, x.device, x.dtype)
    return launch(x, weight, bias, list(stride), list(padding), list(dilation), groups)


@conv2d_relu_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # meta tensors: shapes only


@torch.library.custom_op("dlcore::conv2d_relu_backward", mutates_args=())
def conv2d_relu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                            has_bias: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                            groups: int, mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, launch = _dispatch.select(BACKWARD, x.device, x.dtype)
    dx, dw, db = launch(grad_y, x, weight, y, has_bias, list(stride), list(padding), list(dilation), groups,
                        list(mask))
    # custom ops return tensors, never None: empty placeholders for the gradients not asked for
    empty = x.new_empty(0)
    return (empty if dx is None else dx), (empty if dw is None else dw), (empty if db is None else db)


@conv2d_relu_backward_op.register_fake
def _(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask):
    return (torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(weight) if mask[1] else
            weight.new_empty(0), weight.new_empty(weight.shape[0]) if has_bias and mask[2] else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conf = (bias is not None, list(stride), list(padding), list(dilation), groups)


def _backward(ctx, grad_y):
    x, weight, y = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups = ctx.conf
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    dx, dw, db = conv2d_relu_backward_op(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None)


conv2d_relu_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------- public
def conv2d_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                dilation=1, groups: int = 1) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, stride, padding, dilation, groups)), as torch.nn.functional.conv2d followed by
    relu. x: [N, C_in, H, W] or [C_in, H, W] (NCHW or channels_last), weight: [C_out, C_in/groups, kH, kW],
    bias: [C_out] or None; floating dtypes (the CPU twin runs fp32, other dtypes the reference)."""
    for name, t in (("input", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but input is {x.dtype}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in/groups, kH, kW], got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.dim() == 3:
        return conv2d_relu(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
    if x.dim() != 4:
        raise ValueError(f"input must be 3-D or 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups or x.shape[1] // groups != weight.shape[1]:
        raise ValueError(f"groups={groups} does not fit input channels {x.shape[1]}, weight {tuple(weight.shape)}")
    if isinstance(padding, str):
        raise ValueError("string padding ('same'/'valid') is not supported yet; pass integers")
    return conv2d_relu_op(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), int(groups))
