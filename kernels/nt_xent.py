"""Triton fused NT-Xent: the `triton` backend of dlcore/ops/nt_xent.py, on L2-normalised embeddings u [M, d] (M = 2N,
positive of row i = row (i + N) mod M), flash-style: the M×M similarities exist only as BM×BN tiles in registers.

v1 (shipped):
- forward: one program per BM rows; the row block (BM × BD, whole width in registers) against column tiles of BN
  rows: s = u_rows·u_colsᵀ/τ by tl.dot (tf32 on a GPU, exact fp32 in the interpreter; fp32 accumulate), the
  diagonal masked, online log-sum-exp (running max and rescaled sum); the positive's similarity picked out of its
  tile. Saves lse [M] (O(M) extra memory).
- backward: one program per BM rows, the same sweep: W = exp(s − lse_row) + exp(s − lse_col) (row i's softmax plus
  row j's softmax at column i — s is symmetric), W_ii = 0, W_{i,p(i)} −= 2; du_rows += W·u_cols by tl.dot, scaled by
  g/(Mτ) at the end. Every du row is written by one program: no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, aot_signature, dual_kernel, gpu_tiles, max_combine, sum_combine


@dual_kernel
def nt_xent_forward_kernel(U, LSE, POS, m, d, half, inv_tau, BM: tl.constexpr, BN: tl.constexpr,
                           BD: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k = tl.arange(0, BD)
    rmask = rows < m
    a = tl.load(U + rows[:, None].to(tl.int64) * d + k[None, :], mask=rmask[:, None] & (k[None, :] < d), other=0.0)
    partner = (rows + half) % m
    run_max = tl.full([BM], -float("inf"), tl.float32)
    run_sum = tl.full([BM], 0.0, tl.float32)
    pos = tl.full([BM], 0.0, tl.float32)
    for start in range(0, m, BN):
        cols = start + tl.arange(0, BN)
        b = tl.load(U + cols[:, None].to(tl.int64) * d + k[None, :], mask=(cols[:, None] < m) & (k[None, :] < d),
                    other=0.0)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * inv_tau
        pos += tl.reduce(tl.where(cols[None, :] == partner[:, None], s, 0.0), 1, sum_combine)
        s = tl.where((cols[None, :] < m) & (cols[None, :] != rows[:, None]), s, -float("inf"))
        new_max = tl.maximum(run_max, tl.reduce(s, 1, max_combine))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.reduce(tl.exp(s - new_max[:, None]), 1, sum_combine)
        run_max = new_max
    tl.store(LSE + rows, run_max + tl.log(run_sum), mask=rmask)
    tl.store(POS + rows, pos, mask=rmask)


@dual_kernel
def nt_xent_backward_kernel(U, LSE, DU, m, d, half, inv_tau, scale, BM: tl.constexpr, BN: tl.constexpr,
                            BD: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    k = tl.arange(0, BD)
    rmask = rows < m
    a = tl.load(U + rows[:, None].to(tl.int64) * d + k[None, :], mask=rmask[:, None] & (k[None, :] < d), other=0.0)
    lse_rows = tl.load(LSE + rows, mask=rmask, other=0.0)
    partner = (rows + half) % m
    acc = tl.full([BM, BD], 0.0, tl.float32)
    for start in range(0, m, BN):
        cols = start + tl.arange(0, BN)
        cmask = cols < m
        b = tl.load(U + cols[:, None].to(tl.int64) * d + k[None, :], mask=cmask[:, None] & (k[None, :] < d),
                    other=0.0)
        lse_cols = tl.load(LSE + cols, mask=cmask, other=0.0)
        s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * inv_tau
        w = tl.exp(s - lse_rows[:, None]) + tl.exp(s - lse_cols[None, :])
        w = tl.where(cols[None, :] == partner[:, None], w - 2.0, w)
        w = tl.where(cmask[None, :] & (cols[None, :] != rows[:, None]) & rmask[:, None], w, 0.0)
        acc += tl.dot(w.to(b.dtype), b, input_precision=PRECISION)
    tl.store(DU + rows[:, None].to(tl.int64) * d + k[None, :], acc * scale, mask=rmask[:, None] & (k[None, :] < d))


MAX_DIM = 256


def _tiles(d: int, on_gpu: bool) -> tuple[int, int, int, int, str]:
    """(BM, BN, BD, num_warps, dot precision). GPU: tf32 tensor-core dots (exact fp32 "ieee" dots run on the FMA
    units and spill at these widths), 32×64 tiles (32×32 at d > 128) with 8 warps: spill-free on sm_90 (4 warps or
    64-row blocks spill in backward). Interpreter: exact fp32 dots, large blocks (its cost is per program and step).
    """
    bd = max(16, triton.next_power_of_2(d))
    if bd > MAX_DIM:
        raise ValueError(f"the triton nt_xent handles embeddings of at most {MAX_DIM} dims, got {d}")
    if not on_gpu:
        return 128, 256, bd, 4, "ieee"
    return 32, 64 if bd <= 128 else 32, bd, 8, "tf32"


def forward(u: torch.Tensor, temperature: float):
    """u: [M, d] fp32 contiguous, rows L2-normalised. Returns (lse, pos) fp32 [M]."""
    m, d = u.shape
    lse = torch.empty(m, dtype=torch.float32, device=u.device)
    pos = torch.empty_like(lse)
    bm, bn, bd, warps, precision = _tiles(d, gpu_tiles(u))
    nt_xent_forward_kernel.launch((triton.cdiv(m, bm),), u.device, u, lse, pos, m, d, m // 2, 1.0 / temperature,
                                  BM=bm, BN=bn, BD=bd, PRECISION=precision, num_warps=warps)
    return lse, pos


def backward(u: torch.Tensor, lse: torch.Tensor, temperature: float, scale: float):
    """du [M, d] fp32 (see the module docstring); scale = g/(M·τ)."""
    m, d = u.shape
    du = torch.empty_like(u)
    bm, bn, bd, warps, precision = _tiles(d, gpu_tiles(u))
    nt_xent_backward_kernel.launch((triton.cdiv(m, bm),), u.device, u, lse, du, m, d, m // 2, 1.0 / temperature,
                                   scale, BM=bm, BN=bn, BD=bd, PRECISION=precision, num_warps=warps)
    return du


def _aot_configs():
    configs = []
    ptrs = {"U": "*fp32", "LSE": "*fp32", "POS": "*fp32", "DU": "*fp32"}
    for d in (128, 256):
        bm, bn, bd, warps, precision = _tiles(d, True)
        for kernel in (nt_xent_forward_kernel, nt_xent_backward_kernel):
            constexprs = {"BM": bm, "BN": bn, "BD": bd, "PRECISION": precision}
            configs.append(AOTConfig(kernel, aot_signature(kernel, ptrs, constexprs, floats=("inv_tau", "scale")),
                                     constexprs, num_warps=warps, label=f"{kernel.__name__} d{d} {bm}x{bn} w{warps}"))
    return configs


AOT_CONFIGS = _aot_configs()
