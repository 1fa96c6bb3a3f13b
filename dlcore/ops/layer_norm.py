"""Fused (residual add +) LayerNorm, forward and backward (issue 5).

    h = x + residual (when given),  y = (h − μ)/√(σ² + ε)·w + b   over the last dims (normalized_shape)

A pre-LN transformer adds each sublayer's output to the residual stream and normalises the sum for the next
sublayer: one pass here reads x and the residual once and writes both h (the new stream) and y.

Launcher signature shared by every backend (x, residual: [rows, cols] contiguous, same dtype; weight, bias: None
or [cols] in the statistics dtype — fp32, or float64 for float64 inputs):
  forward(x, residual, weight, bias, eps) -> (y, h or None, mean, rstd)           mean, rstd: [rows], stats dtype
  backward(grad_y, grad_h, h, weight, mean, rstd) -> (grad_input, grad_weight, grad_bias)
grad_h is the gradient reaching h directly (the residual stream) or None; grad_input is the gradient of x and of
the residual alike (h = x + residual); h is x itself when there is no residual.
Backward formula (ĥ = (h − μ)·ρ, ρ = 1/√(σ² + ε), g = dy·w, means over the row):
  dh = ρ·(g − mean(g) − ĥ·mean(g·ĥ)) + grad_h,   dw = Σ_rows dy·ĥ,   db = Σ_rows dy.

Backends
  reference  plain PyTorch in the statistics dtype (the test oracle; float64 gradcheck).
  cpu        csrc/cpu/layer_norm.cpp: OpenMP over rows, fp32/bf16/fp16 storage, fp32 math.
  triton     kernels/layer_norm.py: one row tile in registers, rows up to 4096 wide (wider rows run the
             reference unless triton is asked for by name, which raises).
  cuda       not written (a helper op: Triton's kernel is the GPU path): reported unavailable.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from dlcore import _checks, _dispatch, _eager, _ext

FORWARD, BACKWARD = "layer_norm", "layer_norm_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton",))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW = (torch.float32, torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------- reference
@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(x, residual, weight, bias, eps):
    h = x + residual if residual is not None else None
    v = (x if h is None else h).to(stats_dtype(x.dtype))
    mean = v.mean(-1)
    rstd = torch.rsqrt((v - mean[:, None]).square().mean(-1) + eps)
    y = (v - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), h, mean, rstd


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(grad_y, grad_h, h, weight, mean, rstd):
    sd = stats_dtype(h.dtype)
    dy = grad_y.to(sd)
    xhat = (h.to(sd) - mean[:, None]) * rstd[:, None]
    g = dy * weight if weight is not None else dy
    dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if grad_h is not None:
        dx = dx + grad_h.to(sd)
    return dx.to(h.dtype), (dy * xhat).sum(0), dy.sum(0)


# ---------------------------------------------------------------------------------------------------- cpu (C++)
def _addr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)
def cpu_forward(x, residual, weight, bias, eps):
    rows, cols = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(rows, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _ext.cpu.layer_norm_forward(x.data_ptr(), _addr(residual), _addr(weight), _addr(bias), y.data_ptr(), _addr(h),
                                mean.data_ptr(), rstd.data_ptr(), rows, cols, eps, _ext.DTYPE_CODE[x.dtype])
    return y, h, mean, rstd


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)
def cpu_backward(grad_y, grad_h, h, weight, mean, rstd):
    rows, cols = h.shape
    dx = torch.empty_like(h)
    dw = torch.empty(cols, dtype=torch.float32)
    db = torch.empty_like(dw)
    _ext.cpu.layer_norm_backward(grad_y.data_ptr(), _addr(grad_h), h.data_ptr(), _addr(weight), mean.data_ptr(),
                                 rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(), rows, cols,
                                 _ext.DTYPE_CODE[h.dtype])
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                    available=_ext.triton_unavailable("layer_norm"))
def triton_forward(x, residual, weight, bias, eps):
    from dlcore.kernels import layer_norm

    return layer_norm.forward(x, residual, weight, bias, eps)


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                    available=_ext.triton_unavailable("layer_norm"))
def triton_backward(grad_y, grad_h, h, weight, mean, rstd):
    from dlcore.kernels import layer_norm

    return layer_norm.backward(grad_y, grad_h, h, weight, mean, rstd)


# ---------------------------------------------------------------------------------------------------- custom ops
TRITON_MAX_COLS = 4096  # kernels/layer_norm.py MAX_COLS (not imported: triton may be missing)


@torch.library.custom_op("dlcore::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    y, h, mean, rstd = _dispatch.select_within(FORWARD, x, TRITON_MAX_COLS)(x, residual, weight, bias, eps)
    return y, (x.new_empty(0) if h is None else h), mean, rstd  # custom ops return tensors, never None


@layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    stats = x.new_empty(x.shape[0], dtype=stats_dtype(x.dtype))
    return torch.empty_like(x), (torch.empty_like(x) if residual is not None else x.new_empty(0)), stats, \
        torch.empty_like(stats)


@torch.library.custom_op("dlcore::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad_y: torch.Tensor, grad_h: Optional[torch.Tensor], h: torch.Tensor,
                           weight: Optional[torch.Tensor], mean: torch.Tensor,
                           rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    launch = _dispatch.select_within(BACKWARD, h, TRITON_MAX_COLS)
    dx, dw, db = launch(grad_y.contiguous(), None if grad_h is None else grad_h.contiguous(), h, weight, mean, rstd)
    return dx, dw.to(mean.dtype), db.to(mean.dtype)


@layer_norm_backward_op.register_fake
def _(grad_y, grad_h, h, weight, mean, rstd):
    return torch.empty_like(h), mean.new_empty(h.shape[1]), mean.new_empty(h.shape[1])


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.flags = (residual is not None, weight is not None, bias is not None)
    ctx.eps = eps


def _differentiable_backward(grad_y, grad_h, h, weight, eps):
    """(dx, dw, db) from plain torch ops, for a backward with create_graph=True (a gradient penalty, double
    backprop): reference_backward's formula with μ and (σ² + ε)^-½ recomputed from h by torch ops (the saved
    statistics are this op's outputs, whose gradients its backward does not take), so autograd can differentiate
    the result in dy, γ and h. h is x, or the saved x + residual output: differentiating through that output
    reaches x and residual through this op's backward (dh = dx = d_residual). Formed directly, not by
    autograd.grad: a grad taken with respect to this op's own output would run this backward again, endlessly."""
    v = h.to(stats_dtype(h.dtype))
    mean = v.mean(-1)
    rstd = torch.rsqrt((v - mean[:, None]).square().mean(-1) + eps)
    return reference_backward(grad_y, grad_h, h, weight, mean, rstd)


def _backward(ctx, grad_y, grad_h, _grad_mean, _grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    has_residual, has_weight, has_bias = ctx.flags
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    if _eager.torch_ops_backward(grad_y, grad_h):  # create_graph=True: gradients that autograd can differentiate again
        dx, dw, db = _differentiable_backward(grad_y, grad_h if has_residual else None, h, weight, ctx.eps)
    else:
        dx, dw, db = _layer_norm_backward(grad_y, grad_h if has_residual else None, h, weight, mean, rstd)
    return (dx, dx if has_residual else None, dw if has_weight else None, db if has_bias else None, None)


_layer_norm = _eager.eager_autograd(layer_norm_op, _setup_context, _backward)
_layer_norm_backward = _eager.direct(layer_norm_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def layer_norm(input: torch.Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[torch.Tensor] = None):
    """torch.nn.functional.layer_norm, with an optional residual add fused in front.

    input: [..., *normalized_shape], floating point; weight, bias: normalized_shape (any floating dtype: the math
    runs in fp32, float64 for float64 input). residual: input's shape and device; another floating dtype is
    promoted with input's, as `input + residual` would be.
    Returns y (input's dtype and shape), or (y, h) with h = input + residual when a residual is given (both in
    the promoted dtype).
    """
    _checks.tensor("input", input)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    if not shape or any(s <= 0 for s in shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(f"normalized_shape {shape} must be non-empty and match the last dims of input "
                         f"{tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.tensor(name, t, like=input, same_dtype=False)
            _checks.shape(name, t, shape)
    if residual is not None:  # of another floating dtype: both promoted, as input + residual would be
        _checks.tensor("residual", residual, like=input, same_dtype=False)
        _checks.shape("residual", residual, input.shape)
        if residual.dtype is not input.dtype:
            common = torch.promote_types(input.dtype, residual.dtype)
            input, residual = input.to(common), residual.to(common)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps}")
    cols = math.prod(shape)
    sd = stats_dtype(input.dtype)
    x2 = input.reshape(-1, cols).contiguous()
    r2 = residual.reshape(-1, cols).contiguous() if residual is not None else None
    w, b = (None if t is None else _checks.dense_vector(t, sd) for t in (weight, bias))
    if x2.shape[0] == 0:  # nothing to normalise: the reference handles empty batches (no kernel launch)
        y, h, _, _ = reference_forward(x2, r2, w, b, eps)
    else:
        y, h, _, _ = _layer_norm(x2, r2, w, b, float(eps))
    y = y.view_as(input)  # (view_as: view(torch.Size) costs ~2.4 µs)
    return y if residual is None else (y, h.view_as(input))
