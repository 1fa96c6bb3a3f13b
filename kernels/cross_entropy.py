"""Triton softmax cross-entropy, chunked over the vocabulary: the `triton` backend of dlcore/ops/cross_entropy.py.

v1 (shipped): one kernel, one program per RB rows, looping over the vocabulary BV logits at a time, so any
vocabulary fits (the row is never held whole):
- FORWARD: online max / Σe^{z−m} (fp32), plus Σz and z_target; writes loss and lse per row.
    loss = lse − (1 − ε)·z_t − (ε/V)·Σ_j z_j   (0 for rows whose target is ignore_index)
- GRAD: a second pass writes ∂loss/∂z_j = e^{z_j − lse} − ε/V − (1 − ε)·[j = t], times the row's scale, over the
  logits (in place) or into a separate buffer; ignored rows get 0. With FORWARD off it reads lse from the forward
  (the backward of the standalone op); with it on the fused linear + cross-entropy gets loss and gradient in one
  launch per chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, aot_signature, dual_kernel, gpu_tiles, max_combine, sum_combine


@dual_kernel
def cross_entropy_kernel(Z, T, LOSS, LSE, G, SCALE, rows, V, stride, scale_stride, ignore_index, smoothing,
                         FORWARD: tl.constexpr, GRAD: tl.constexpr, RB: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    rmask = r < rows
    t = tl.load(T + r, mask=rmask, other=ignore_index)
    ignored = t == ignore_index
    base = r[:, None].to(tl.int64) * stride
    offs = tl.arange(0, BV)
    if FORWARD:
        m = tl.full([RB], float("-inf"), tl.float32)
        s = tl.full([RB], 0.0, tl.float32)
        sum_z = tl.full([RB], 0.0, tl.float32)
        z_t = tl.full([RB], 0.0, tl.float32)
        for start in range(0, V, BV):
            cols = start + offs
            mask = rmask[:, None] & (cols[None, :] < V)
            z = tl.load(Z + base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.reduce(z, 1, max_combine))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.reduce(tl.exp(z - m_safe[:, None]), 1, sum_combine)
            sum_z += tl.reduce(tl.where(mask, z, 0.0), 1, sum_combine)
            z_t += tl.reduce(tl.where(cols[None, :] == t[:, None], z, 0.0), 1, sum_combine)
            m = m_new
        lse = tl.where(m == float("-inf"), m, m + tl.log(s))
        loss = lse - (1.0 - smoothing) * z_t - smoothing / V * sum_z
        tl.store(LOSS + r, tl.where(ignored, 0.0, loss), mask=rmask)
        tl.store(LSE + r, lse, mask=rmask)
    else:
        lse = tl.load(LSE + r, mask=rmask, other=0.0)
    if GRAD:
        scale = tl.where(ignored, 0.0, tl.load(SCALE + r * scale_stride, mask=rmask, other=0.0))
        for start in range(0, V, BV):
            cols = start + offs
            mask = rmask[:, None] & (cols[None, :] < V)
            z = tl.load(Z + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse[:, None]) - smoothing / V - tl.where(cols[None, :] == t[:, None], 1.0 - smoothing, 0.0)
            tl.store(G + base + cols[None, :], (g * scale[:, None]).to(G.dtype.element_ty), mask=mask)


def _tile(on_gpu: bool) -> tuple[int, int, int]:
    """(RB, BV, num_warps): one row per program on a GPU (rows are long), many rows per program interpreted."""
    return (1, 4096, 8) if on_gpu else (16, 4096, 4)


def launch(logits, target, loss, lse, grad, scale, ignore_index: int, smoothing: float, forward: bool):
    """logits [rows, V] (last dim contiguous; rows `stride` apart, the gradient buffer likewise); scale: fp32 [rows]
    or an expanded scalar (stride 0)."""
    rows, V = logits.shape
    rb, bv, warps = _tile(gpu_tiles(logits))
    dummy = lse
    cross_entropy_kernel.launch((triton.cdiv(rows, rb),), logits.device, logits, target,
                                dummy if loss is None else loss, lse, logits if grad is None else grad,
                                dummy if scale is None else scale, rows, V, logits.stride(0),
                                0 if scale is None else scale.stride(0), ignore_index, smoothing,
                                FORWARD=forward, GRAD=grad is not None, RB=rb, BV=bv, num_warps=warps)


def _aot_configs():
    rb, bv, warps = _tile(True)
    configs = []
    for dtype in ("bf16", "fp32"):
        ptrs = {"Z": f"*{dtype}", "G": f"*{dtype}", "T": "*i64", "LOSS": "*fp32", "LSE": "*fp32", "SCALE": "*fp32"}
        for forward, grad in ((True, False), (True, True), (False, True)):
            constexprs = dict(FORWARD=forward, GRAD=grad, RB=rb, BV=bv)
            sig = aot_signature(cross_entropy_kernel, ptrs, constexprs, floats=("smoothing",),
                                int64s=("stride", "ignore_index"))
            configs.append(AOTConfig(cross_entropy_kernel, sig, constexprs, num_warps=warps,
                                     label=f"cross_entropy {dtype} fwd={forward} grad={grad} {rb}x{bv} w{warps}"))
    return configs


AOT_CONFIGS = _aot_configs()
