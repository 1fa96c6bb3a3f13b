"""Triton fused bias + activation (GELU erf/tanh, ReLU, identity) + dropout: the `triton` backend of
dlcore/ops/bias_gelu.py.

v1 (shipped): a 2-D grid of [RB rows × BC cols] tiles over x [rows, cols].
- forward: y = act(x + b), fp32 math, stored in x's dtype.
- backward: dx = dy·act'(x + b); each tile's column sums of dx go to row `tile row` of an fp32 partial buffer that
  the launcher sums (deterministic, no atomics).
GELU (u = x + b):  exact  ½u(1 + erf(u/√2)),  gelu' = Φ(u) + u·e^{−u²/2}/√(2π);
                   tanh   ½u(1 + t), t = tanh(k(u + a·u³)),  gelu' = ½(1 + t) + ½u(1 − t²)·k(1 + 3a·u²),
with tanh(z) = 1 − 2/(e^{2z} + 1) (exact at both infinities; Triton has no portable tanh).
Dropout (DROPOUT): y = gelu(u)·keep/(1 − p), keep from kernels/attention.py's Philox helper with counter
(col, row, 0, 0) — the same elements as the C++ twin and the reference — regenerated in backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, aot_signature, dual_helper, dual_kernel, gpu_tiles, sum_combine
from dlcore.kernels.attention import _dropout_keep


@dual_helper
def _tanh(z):
    return 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)


@dual_helper
def _act_and_grad(u, ACT: tl.constexpr):
    """(act(u), act'(u)) in fp32; ACT: 0 GELU (erf), 1 GELU (tanh), 2 ReLU, 3 identity."""
    if ACT == 1:
        t = _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
        y = 0.5 * u * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
    elif ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        y = u * cdf
        dy = cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)
    elif ACT == 2:
        y = tl.where(u < 0.0, 0.0, u)  # a NaN stays NaN, as in torch.relu (tl.maximum would drop it)
        dy = tl.where(u > 0, 1.0, 0.0)
    else:
        y = u
        dy = tl.full(u.shape, 1.0, tl.float32)
    return y, dy


@dual_helper
def _tile_pre_activation(X, BIAS, rows, cols, HAS_BIAS: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr):
    """This program's [RB × BC] tile: (rows, cols, mask, offsets, u = x + b in fp32)."""
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    off = r[:, None].to(tl.int64) * cols + c[None, :]
    u = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(BIAS + c, mask=c < cols, other=0.0)[None, :]
    return r, c, mask, off, u


@dual_kernel
def bias_gelu_forward_kernel(X, BIAS, Y, rows, cols, seed, threshold, drop_scale, HAS_BIAS: tl.constexpr,
                             ACT: tl.constexpr, DROPOUT: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr):
    r, c, mask, off, u = _tile_pre_activation(X, BIAS, rows, cols, HAS_BIAS, RB, BC)
    y, _ = _act_and_grad(u, ACT)
    if DROPOUT:
        y = tl.where(_dropout_keep(seed, r, c, tl.program_id(0) * 0, threshold), y * drop_scale, 0.0)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


@dual_kernel
def bias_gelu_backward_kernel(DY, X, BIAS, DX, DB, rows, cols, seed, threshold, drop_scale, HAS_BIAS: tl.constexpr,
                              ACT: tl.constexpr, DROPOUT: tl.constexpr, RB: tl.constexpr, BC: tl.constexpr):
    r, c, mask, off, u = _tile_pre_activation(X, BIAS, rows, cols, HAS_BIAS, RB, BC)
    _, grad = _act_and_grad(u, ACT)
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        dy = tl.where(_dropout_keep(seed, r, c, tl.program_id(0) * 0, threshold), dy * drop_scale, 0.0)
    dx = tl.where(mask, dy * grad, 0.0)
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DB + tl.program_id(0) * cols + c, tl.reduce(dx, 0, sum_combine), mask=c < cols)


def _tile(on_gpu: bool) -> tuple[int, int, int]:
    """(RB, BC, num_warps): 32×128 tiles on a GPU, one large tile per program in the interpreter."""
    return (32, 128, 4) if on_gpu else (64, 1024, 4)


def _dropout_args(dropout_p: float, seed: int) -> dict:
    return dict(seed=seed, threshold=min(int(round(dropout_p * 2 ** 32)), 2 ** 32),
                drop_scale=1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0, DROPOUT=dropout_p > 0)


def forward(x, bias, activation: int, dropout_p: float = 0.0, seed: int = 0):
    rows, cols = x.shape
    y = torch.empty_like(x)
    rb, bc, warps = _tile(gpu_tiles(x))
    bias_gelu_forward_kernel.launch((triton.cdiv(rows, rb), triton.cdiv(cols, bc)), x.device, x,
                                    x if bias is None else bias, y, rows, cols, HAS_BIAS=bias is not None,
                                    ACT=activation, RB=rb, BC=bc, num_warps=warps,
                                    **_dropout_args(dropout_p, seed))
    return y


def backward(grad_y, x, bias, activation: int, dropout_p: float = 0.0, seed: int = 0):
    rows, cols = x.shape
    rb, bc, warps = _tile(gpu_tiles(x))
    dx = torch.empty_like(x)
    partial = torch.empty((triton.cdiv(rows, rb), cols), dtype=torch.float32, device=x.device)
    bias_gelu_backward_kernel.launch((triton.cdiv(rows, rb), triton.cdiv(cols, bc)), x.device, grad_y, x,
                                     x if bias is None else bias, dx, partial, rows, cols, HAS_BIAS=bias is not None,
                                     ACT=activation, RB=rb, BC=bc, num_warps=warps,
                                     **_dropout_args(dropout_p, seed))
    return dx, partial.sum(0)


def _aot_configs():
    rb, bc, warps = _tile(True)
    ptrs = {n: "*bf16" for n in ("X", "Y", "DY", "DX")}
    ptrs.update(BIAS="*fp32", DB="*fp32")
    configs = []
    for kernel in (bias_gelu_forward_kernel, bias_gelu_backward_kernel):
        for act, dropout in ((0, False), (1, False), (1, True), (2, True)):
            constexprs = dict(HAS_BIAS=True, ACT=act, DROPOUT=dropout, RB=rb, BC=bc)
            sig = aot_signature(kernel, ptrs, constexprs, floats=("drop_scale",), int64s=("seed", "threshold"))
            configs.append(AOTConfig(kernel, sig, constexprs, num_warps=warps,
                                     label=f"{kernel.__name__} {('erf', 'tanh', 'relu')[act]}{' dropout' if dropout else ''}"
                                           f" {rb}x{bc} w{warps}"))
    return configs


AOT_CONFIGS = _aot_configs()
