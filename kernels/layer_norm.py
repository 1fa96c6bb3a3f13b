"""Triton fused (residual add +) LayerNorm: the `triton` backend of dlcore/ops/layer_norm.py.

v1 (shipped):
- forward: one program per RB rows, the whole row in registers (BN = next power of two ≥ cols, at most 4096; wider rows spill in backward on sm_90):
  h = x + r (stored, rounded to the storage dtype first), μ, σ² by two passes over the registers, y = (h − μ)·ρ·w + b;
  μ and ρ = 1/√(σ² + ε) saved in fp32.
- backward: a fixed number of programs, each walking a contiguous range of rows RB at a time:
  ĥ = (h − μ)·ρ, g = dy·w, dh = ρ·(g − mean(g) − ĥ·mean(g·ĥ)) + dh_direct; each program's Σ dy·ĥ and Σ dy go to its
  own row of an fp32 partial buffer that the launcher sums (no atomics: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, aot_signature, dual_kernel, gpu_tiles, sum_combine

MAX_COLS = 4096


@dual_kernel
def layer_norm_forward_kernel(X, R, W, B, Y, H, MEAN, RSTD, rows, cols, eps, HAS_RES: tl.constexpr,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    c = tl.arange(0, BN)
    cmask = c < cols
    mask = (r[:, None] < rows) & cmask[None, :]
    off = r[:, None].to(tl.int64) * cols + c[None, :]
    x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h = (x + tl.load(R + off, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + off, h, mask=mask)
        x = h.to(tl.float32)
    mean = tl.reduce(x, 1, sum_combine) / cols
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.reduce(d * d, 1, sum_combine) / cols + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + c, mask=cmask, other=0.0)[None, :]
    if HAS_B:
        y = y + tl.load(B + c, mask=cmask, other=0.0)[None, :]
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + r, mean, mask=r < rows)
    tl.store(RSTD + r, rstd, mask=r < rows)


@dual_kernel
def layer_norm_backward_kernel(DY, DD, H, W, MEAN, RSTD, DX, DW, DB, rows, cols, rows_per_program,
                               HAS_DD: tl.constexpr, HAS_W: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.arange(0, BN)
    cmask = c < cols
    w = tl.full([BN], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0)
    dw = tl.full([BN], 0.0, tl.float32)
    db = tl.full([BN], 0.0, tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for start in range(first, last, RB):
        r = start + tl.arange(0, RB)
        rmask = r < last
        mask = rmask[:, None] & cmask[None, :]
        off = r[:, None].to(tl.int64) * cols + c[None, :]
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + off, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + r, mask=rmask, other=0.0)
        xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        mg = tl.reduce(g, 1, sum_combine) / cols
        mgh = tl.reduce(g * xhat, 1, sum_combine) / cols
        dx = rstd[:, None] * (g - mg[:, None] - xhat * mgh[:, None])
        if HAS_DD:
            dx += tl.load(DD + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.reduce(dy * xhat, 0, sum_combine)
        db += tl.reduce(dy, 0, sum_combine)
    tl.store(DW + pid * cols + c, dw, mask=cmask)
    tl.store(DB + pid * cols + c, db, mask=cmask)


def _tile(cols: int, on_gpu: bool, backward: bool = False) -> tuple[int, int, int]:
    """(RB rows per tile, BN, num_warps): 4K-element tiles forward and 2K backward (more live arrays) on a GPU,
    at most 32 elements per thread and array (each entry spill-free on sm_90); large tiles for the interpreter."""
    bn = triton.next_power_of_2(cols)
    if bn > MAX_COLS:
        raise ValueError(f"the triton layer_norm handles rows of at most {MAX_COLS} elements, got {cols}")
    if not on_gpu:
        return max(1, 65536 // bn), bn, 4
    warps = 4 if bn <= 1024 else 8 if bn <= 2048 else 16 if bn <= 4096 else 32
    return max(1, (2048 if backward else 4096) // bn), bn, warps


def forward(x, residual, weight, bias, eps: float):
    """x, residual: [rows, cols] contiguous, same dtype; weight, bias: fp32 [cols] or None.
    Returns (y, h or None, mean, rstd)."""
    rows, cols = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    rb, bn, warps = _tile(cols, gpu_tiles(x))
    layer_norm_forward_kernel.launch((triton.cdiv(rows, rb),), x.device, x, x if residual is None else residual,
                                     x if weight is None else weight, x if bias is None else bias, y,
                                     y if h is None else h, mean, rstd, rows, cols, eps, HAS_RES=residual is not None,
                                     HAS_W=weight is not None, HAS_B=bias is not None, RB=rb, BN=bn, num_warps=warps)
    return y, h, mean, rstd


def backward(grad_y, grad_h, h, weight, mean, rstd):
    """Returns (grad_input [rows, cols] in h's dtype, dw fp32 [cols], db fp32 [cols])."""
    rows, cols = h.shape
    rb, bn, warps = _tile(cols, gpu_tiles(h), backward=True)
    programs = min(triton.cdiv(rows, rb), (torch.cuda.get_device_properties(h.device).multi_processor_count * 2
                                           if h.is_cuda else 2))
    per_program = triton.cdiv(triton.cdiv(rows, programs), rb) * rb
    programs = triton.cdiv(rows, per_program)
    dx = torch.empty_like(h)
    dw = torch.empty((programs, cols), dtype=torch.float32, device=h.device)
    db = torch.empty_like(dw)
    layer_norm_backward_kernel.launch((programs,), h.device, grad_y, h if grad_h is None else grad_h, h,
                                      h if weight is None else weight, mean, rstd, dx, dw, db, rows, cols,
                                      per_program, HAS_DD=grad_h is not None, HAS_W=weight is not None, RB=rb, BN=bn,
                                      num_warps=warps)
    return dx, dw.sum(0), db.sum(0)


def _aot_configs():
    """bf16 rows of GPT-2/BERT widths (768, 1024), each warp-count class, and the widest row, every feature on."""
    configs = []
    for cols in (768, 1024, 2048, MAX_COLS):
        ptrs = {n: "*bf16" for n in ("X", "R", "Y", "H", "DY", "DD", "DX")}
        ptrs.update({n: "*fp32" for n in ("W", "B", "MEAN", "RSTD", "DW", "DB")})
        for kernel, flags in ((layer_norm_forward_kernel, dict(HAS_RES=True, HAS_W=True, HAS_B=True)),
                              (layer_norm_backward_kernel, dict(HAS_DD=True, HAS_W=True))):
            rb, bn, warps = _tile(cols, True, backward=kernel is layer_norm_backward_kernel)
            constexprs = {**flags, "RB": rb, "BN": bn}
            configs.append(AOTConfig(kernel, aot_signature(kernel, ptrs, constexprs, floats=("eps",)), constexprs,
                                     num_warps=warps, label=f"{kernel.__name__} cols{cols} {rb}x{bn} w{warps}"))
    return configs


AOT_CONFIGS = _aot_configs()
