"""Triton fused additive (Bahdanau) attention: the `triton` backend of dlcore/ops/additive_attention.py.

v1 (shipped): one program per batch row, looping over the source positions BS at a time, the attention width A
and feature width D held whole (BA, BD = next powers of two, at most 1024).
- forward: e_j = v·tanh(ws + uh_j) for a tile of positions, online softmax (running max and sum) with the context
  c = Σ α_j h_j accumulated on the way; raw scores go to the α buffer and a second pass normalises them.
- backward: pass 1: dα_j = dc·h_j, dh_j = α_j·dc, Σ α·dα; pass 2: t_j recomputed, de_j = α_j (dα_j − Σ α·dα),
  duh_j = de_j·v∘(1 − t_j²), dws = Σ_j duh_j, and the row's Σ_j de_j·t_j into a [B, A] partial for dv (summed by the
  launcher: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import (AOTConfig, aot_signature, dual_helper, dual_kernel, gpu_tiles, max_combine,
                                    sum_combine)

MAX_WIDTH = 1024


@dual_helper
def _tanh_tile(WS, UH, b, j, offs_a, A, S):
    """tanh(ws[b] + uh[b, j]) for the positions j (a [BS, BA] tile, 0 outside)."""
    mask = (j[:, None] < S) & (offs_a[None, :] < A)
    s = tl.load(WS + b * A + offs_a, mask=offs_a < A, other=0.0).to(tl.float32)
    u = tl.load(UH + (b * S + j[:, None]).to(tl.int64) * A + offs_a[None, :], mask=mask, other=0.0).to(tl.float32)
    z = s[None, :] + u
    return tl.where(mask, 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0), 0.0)


@dual_kernel
def additive_attention_forward_kernel(WS, UH, V, H, LEN, CTX, ALPHA, S, A, D, BS: tl.constexpr, BA: tl.constexpr,
                                      BD: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(LEN + b).to(tl.int32)
    offs_a = tl.arange(0, BA)
    offs_d = tl.arange(0, BD)
    v = tl.load(V + offs_a, mask=offs_a < A, other=0.0).to(tl.float32)
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.full([1], 0.0, tl.float32)
    acc = tl.full([BD], 0.0, tl.float32)
    for start in range(0, n, BS):
        j = start + tl.arange(0, BS)
        t = _tanh_tile(WS, UH, b, j, offs_a, A, S)
        e = tl.where(j < n, tl.reduce(t * v[None, :], 1, sum_combine), float("-inf"))
        tl.store(ALPHA + b * S + j, e, mask=j < S)
        m_new = tl.maximum(m, tl.reduce(e, 0, max_combine))
        p = tl.exp(e - m_new)
        scale = tl.exp(m - m_new)
        h = tl.load(H + (b * S + j[:, None]).to(tl.int64) * D + offs_d[None, :],
                    mask=(j[:, None] < n) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        acc = acc * scale + tl.reduce(p[:, None] * h, 0, sum_combine)
        l = l * scale + tl.reduce(p, 0, sum_combine)
        m = m_new
    tl.store(CTX + b * D + offs_d, (acc / l).to(CTX.dtype.element_ty), mask=offs_d < D)
    for start in range(0, S, BS):
        j = start + tl.arange(0, BS)
        e = tl.load(ALPHA + b * S + j, mask=j < n, other=float("-inf"))
        tl.store(ALPHA + b * S + j, tl.exp(e - m) / l, mask=j < S)


@dual_kernel
def additive_attention_backward_kernel(DC, WS, UH, V, H, LEN, ALPHA, DALPHA, DWS, DUH, DV, DH, S, A, D,
                                       BS: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0)
    n = tl.load(LEN + b).to(tl.int32)
    offs_a = tl.arange(0, BA)
    offs_d = tl.arange(0, BD)
    dc = tl.load(DC + b * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    weighted = tl.full([1], 0.0, tl.float32)
    for start in range(0, S, BS):
        j = start + tl.arange(0, BS)
        mask = (j[:, None] < S) & (offs_d[None, :] < D)
        alpha = tl.load(ALPHA + b * S + j, mask=j < S, other=0.0)
        h = tl.load(H + (b * S + j[:, None]).to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        dalpha = tl.reduce(h * dc[None, :], 1, sum_combine)
        tl.store(DALPHA + b * S + j, dalpha, mask=j < S)
        tl.store(DH + (b * S + j[:, None]).to(tl.int64) * D + offs_d[None, :],
                 (alpha[:, None] * dc[None, :]).to(DH.dtype.element_ty), mask=mask)
        weighted += tl.reduce(alpha * dalpha, 0, sum_combine)
    v = tl.load(V + offs_a, mask=offs_a < A, other=0.0).to(tl.float32)
    dws = tl.full([BA], 0.0, tl.float32)
    dv = tl.full([BA], 0.0, tl.float32)
    for start in range(0, S, BS):
        j = start + tl.arange(0, BS)
        alpha = tl.load(ALPHA + b * S + j, mask=j < S, other=0.0)
        dalpha = tl.load(DALPHA + b * S + j, mask=j < S, other=0.0)
        de = tl.where(j < n, alpha * (dalpha - weighted), 0.0)
        t = _tanh_tile(WS, UH, b, j, offs_a, A, S)
        dpre = de[:, None] * v[None, :] * (1.0 - t * t)
        tl.store(DUH + (b * S + j[:, None]).to(tl.int64) * A + offs_a[None, :], dpre.to(DUH.dtype.element_ty),
                 mask=(j[:, None] < S) & (offs_a[None, :] < A))
        dws += tl.reduce(dpre, 0, sum_combine)
        dv += tl.reduce(de[:, None] * t, 0, sum_combine)
    tl.store(DWS + b * A + offs_a, dws.to(DWS.dtype.element_ty), mask=offs_a < A)
    tl.store(DV + b * A + offs_a, dv, mask=offs_a < A)


def _tile(A: int, D: int, on_gpu: bool) -> tuple[int, int, int, int]:
    ba, bd = triton.next_power_of_2(A), triton.next_power_of_2(D)
    if max(ba, bd) > MAX_WIDTH:
        raise ValueError(f"the triton additive attention handles widths up to {MAX_WIDTH}, got A={A}, D={D}")
    if not on_gpu:
        return 64, ba, bd, 4
    return max(1, 2048 // max(ba, bd)), ba, bd, 4


def forward(ws, uh, v, h, lengths):
    B, S, A = uh.shape
    D = h.shape[2]
    ctx = torch.empty((B, D), dtype=h.dtype, device=h.device)
    alpha = torch.empty((B, S), dtype=torch.float32, device=h.device)
    bs, ba, bd, warps = _tile(A, D, gpu_tiles(h))
    additive_attention_forward_kernel.launch((B,), h.device, ws, uh, v, h, lengths, ctx, alpha, S, A, D, BS=bs, BA=ba,
                                             BD=bd, num_warps=warps)
    return ctx, alpha


def backward(dc, ws, uh, v, h, lengths, alpha):
    B, S, A = uh.shape
    D = h.shape[2]
    dalpha = torch.empty((B, S), dtype=torch.float32, device=h.device)
    dws, duh, dh = torch.empty_like(ws), torch.empty_like(uh), torch.empty_like(h)
    dv = torch.empty((B, A), dtype=torch.float32, device=h.device)
    bs, ba, bd, warps = _tile(A, D, gpu_tiles(h))
    additive_attention_backward_kernel.launch((B,), h.device, dc, ws, uh, v, h, lengths, alpha, dalpha, dws, duh, dv,
                                              dh, S, A, D, BS=bs, BA=ba, BD=bd, num_warps=warps)
    return dws, duh, dv.sum(0), dh


def _aot_configs():
    configs = []
    for width in (256, 1024):
        bs, ba, bd, warps = _tile(width, width, True)
        ptrs = {n: "*bf16" for n in ("DC", "WS", "UH", "V", "H", "CTX", "DWS", "DUH", "DH")}
        ptrs.update(LEN="*i64", ALPHA="*fp32", DALPHA="*fp32", DV="*fp32")
        for kernel in (additive_attention_forward_kernel, additive_attention_backward_kernel):
            constexprs = dict(BS=bs, BA=ba, BD=bd)
            configs.append(AOTConfig(kernel, aot_signature(kernel, ptrs, constexprs), constexprs, num_warps=warps,
                                     label=f"{kernel.__name__} A=D={width} BS{bs} w{warps}"))
    return configs


AOT_CONFIGS = _aot_configs()
