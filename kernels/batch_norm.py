"""Triton channel-wise kernels: the `triton` backend of dlcore/ops/batch_norm.py (fused batch norm + residual +
activation) and of the conv epilogue in dlcore/ops/conv_relu.py.

A tensor of C channels is [outer, C, inner] (NCHW: (N, C, H·W); channels_last and [N, C]: (N·H·W, C, 1)). Every
kernel walks tiles of BP positions × BC channels, a position p being the pair (p // inner, p % inner): one code
path for both layouts; the launcher picks the tile shape per layout (BC = 1 for NCHW, a channel block for
channels_last) so that neighbouring lanes read neighbouring addresses.

v1 (shipped):
- stats: a grid of (position ranges × channel blocks); each program folds its tiles into (count, mean, M2) per
  channel by Chan's formula (tile mean and M2 from two passes over the registers: no cancellation) and writes them
  to a partial buffer, merged by the op with the same formula (deterministic, no atomics).
- apply: y = act(scale_c·x + shift_c + r), one tile per program.
- backward_reduce: dz = act'(y)·dy (written when asked: the residual's gradient), per-program partial Σ dz and
  Σ dz·(x − μ) per channel, summed by the launcher.
- backward_apply: dx = a_c·dz + b_c·x + k_c.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, aot_signature, dual_helper, dual_kernel, gpu_tiles, sum_combine

IDENTITY, RELU, LEAKY_RELU = 0, 1, 2


@dual_helper
def _tile(pid_p, pid_c, first, positions, channels, inner, BP: tl.constexpr, BC: tl.constexpr):
    """Offsets and mask of the tile starting at position `first` (plus the channel vector and its mask)."""
    p = first + tl.arange(0, BP)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < channels
    p64 = p.to(tl.int64)
    off = (p64 // inner)[:, None] * channels * inner + c[None, :].to(tl.int64) * inner + (p64 % inner)[:, None]
    mask = (p < positions)[:, None] & cmask[None, :]
    return off, mask, c, cmask


@dual_helper
def _activation_grad(dy, y, slope, ACT: tl.constexpr):
    """dz = act'(z)·dy read from the output y (y > 0 ⇔ z > 0 for ReLU and LeakyReLU with slope ≥ 0)."""
    if ACT == 1:
        dy = tl.where(y > 0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where(y > 0, dy, dy * slope)
    return dy


@dual_kernel
def stats_kernel(X, PMEAN, PM2, PCOUNT, positions, channels, inner, per_program, BP: tl.constexpr,
                 BC: tl.constexpr):
    pid_p, pid_c = tl.program_id(0), tl.program_id(1)
    n = 0.0
    mean = tl.full([BC], 0.0, tl.float32)
    m2 = tl.full([BC], 0.0, tl.float32)
    start = pid_p * per_program
    end = tl.minimum(start + per_program, positions)
    for first in range(start, end, BP):
        off, mask, c, cmask = _tile(pid_p, pid_c, first, end, channels, inner, BP, BC)
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        n_tile = tl.minimum(end - first, BP).to(tl.float32)
        tile_mean = tl.reduce(x, 0, sum_combine) / n_tile
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.reduce(d * d, 0, sum_combine)
        total = n + n_tile  # Chan: δ = m_b − m_a, m += δ·n_b/n, M2 += M2_b + δ²·n_a·n_b/n
        delta = tile_mean - mean
        mean += delta * (n_tile / total)
        m2 += tile_m2 + delta * delta * (n * n_tile / total)
        n = total
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < channels
    tl.store(PMEAN + pid_p * channels + c, mean, mask=cmask)
    tl.store(PM2 + pid_p * channels + c, m2, mask=cmask)
    tl.store(PCOUNT + pid_p + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + n)


@dual_kernel
def apply_kernel(X, R, SCALE, SHIFT, Y, positions, channels, inner, slope, ACT: tl.constexpr, HAS_R: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pid_p, pid_c = tl.program_id(0), tl.program_id(1)
    off, mask, c, cmask = _tile(pid_p, pid_c, pid_p * BP, positions, channels, inner, BP, BC)
    z = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        z = z * tl.load(SCALE + c, mask=cmask, other=0.0)[None, :]
    if HAS_SHIFT:
        z = z + tl.load(SHIFT + c, mask=cmask, other=0.0)[None, :]
    if HAS_R:
        z = z + tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # a NaN stays NaN, as in torch.relu (tl.maximum would drop it)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    tl.store(Y + off, z.to(Y.dtype.element_ty), mask=mask)


@dual_kernel
def backward_reduce_kernel(DY, Y, X, MEAN, DZ, PS1, PS2, positions, channels, inner, per_program, slope,
                           ACT: tl.constexpr, HAS_X: tl.constexpr, HAS_DZ: tl.constexpr, BP: tl.constexpr,
                           BC: tl.constexpr):
    pid_p, pid_c = tl.program_id(0), tl.program_id(1)
    c = pid_c * BC + tl.arange(0, BC)
    cmask = c < channels
    mean = tl.full([BC], 0.0, tl.float32)
    if HAS_X:
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    s1 = tl.full([BC], 0.0, tl.float32)
    s2 = tl.full([BC], 0.0, tl.float32)
    start = pid_p * per_program
    end = tl.minimum(start + per_program, positions)
    for first in range(start, end, BP):
        off, mask, c, cmask = _tile(pid_p, pid_c, first, end, channels, inner, BP, BC)
        dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
        y = dy
        if ACT != 0:
            y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
        dz = _activation_grad(dy, y, slope, ACT)
        if HAS_DZ:
            tl.store(DZ + off, dz.to(DZ.dtype.element_ty), mask=mask)
        s1 += tl.reduce(dz, 0, sum_combine)
        if HAS_X:
            x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            s2 += tl.reduce(tl.where(mask, dz * (x - mean[None, :]), 0.0), 0, sum_combine)
    tl.store(PS1 + pid_p * channels + c, s1, mask=cmask)
    tl.store(PS2 + pid_p * channels + c, s2, mask=cmask)


@dual_kernel
def backward_apply_kernel(DY, Y, X, A, B, K, DX, positions, channels, inner, slope, ACT: tl.constexpr,
                          HAS_BK: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr):
    pid_p, pid_c = tl.program_id(0), tl.program_id(1)
    off, mask, c, cmask = _tile(pid_p, pid_c, pid_p * BP, positions, channels, inner, BP, BC)
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    y = dy
    if ACT != 0:
        y = tl.load(Y + off, mask=mask, other=0.0).to(tl.float32)
    dx = _activation_grad(dy, y, slope, ACT) * tl.load(A + c, mask=cmask, other=0.0)[None, :]
    if HAS_BK:
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        dx += x * tl.load(B + c, mask=cmask, other=0.0)[None, :] + tl.load(K + c, mask=cmask, other=0.0)[None, :]
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- launchers
def _tile_shape(channels: int, inner: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BP, BC, num_warps): 2K-element tiles on a GPU (8 elements per thread and array with 8 warps), 64K in the
    interpreter (its cost is per program). Channels_last: at most 32 channels a tile (64 spilled backward_reduce's
    build for multiple-of-16 sizes: ptxas held it to 64 registers and spilled 8 bytes)."""
    elements = 2048 if on_gpu else 65536
    bc = 1 if inner > 1 else min(triton.next_power_of_2(channels), 32 if on_gpu else 64)
    return elements // bc, bc, 8 if on_gpu else 4


def _position_programs(positions: int, bp: int, channel_blocks: int, device: torch.device) -> tuple[int, int]:
    """(programs along positions, positions per program) for the reductions: about four programs per SM in all."""
    want = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    programs = max(1, min(triton.cdiv(positions, bp), triton.cdiv(want, channel_blocks)))
    per_program = triton.cdiv(triton.cdiv(positions, programs), bp) * bp
    return triton.cdiv(positions, per_program), per_program


def stats_partials(x, dims):
    """Per-program (count [S, 1], mean [S, C], M2 [S, C]) of x viewed as dims = [outer, C, inner]; the caller
    merges them (dlcore.ops.batch_norm.merge_partials)."""
    outer, channels, inner = dims
    positions = outer * inner
    bp, bc, warps = _tile_shape(channels, inner, gpu_tiles(x))
    programs, per_program = _position_programs(positions, bp, triton.cdiv(channels, bc), x.device)
    pmean = torch.empty((programs, channels), dtype=torch.float32, device=x.device)
    pm2 = torch.empty_like(pmean)
    pcount = torch.empty((programs, 1), dtype=torch.float32, device=x.device)
    stats_kernel.launch((programs, triton.cdiv(channels, bc)), x.device, x, pmean, pm2, pcount, positions, channels,
                        inner, per_program, BP=bp, BC=bc, num_warps=warps)
    return pcount, pmean, pm2


def apply(x, residual, scale, shift, y, dims, activation: int, slope: float):
    """y = act(scale·x + shift + residual) (absent scale: 1, shift: 0); y may be x."""
    outer, channels, inner = dims
    positions = outer * inner
    bp, bc, warps = _tile_shape(channels, inner, gpu_tiles(x))
    apply_kernel.launch((triton.cdiv(positions, bp), triton.cdiv(channels, bc)), x.device, x,
                        x if residual is None else residual, x if scale is None else scale,
                        x if shift is None else shift, y, positions, channels, inner, slope, ACT=activation,
                        HAS_R=residual is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, BP=bp,
                        BC=bc, num_warps=warps)
    return y


def backward_reduce(dy, y, x, mean, dz, dims, activation: int, slope: float):
    """(Σ dz, Σ dz·(x − μ)) fp32 [C] (the second zeros when x is None); dz written when given."""
    outer, channels, inner = dims
    positions = outer * inner
    bp, bc, warps = _tile_shape(channels, inner, gpu_tiles(dy))
    programs, per_program = _position_programs(positions, bp, triton.cdiv(channels, bc), dy.device)
    ps1 = torch.empty((programs, channels), dtype=torch.float32, device=dy.device)
    ps2 = torch.empty_like(ps1)
    backward_reduce_kernel.launch((programs, triton.cdiv(channels, bc)), dy.device, dy, dy if y is None else y,
                                  dy if x is None else x, ps1 if mean is None else mean, dy if dz is None else dz,
                                  ps1, ps2, positions, channels, inner, per_program, slope, ACT=activation,
                                  HAS_X=x is not None, HAS_DZ=dz is not None, BP=bp, BC=bc, num_warps=warps)
    return ps1.sum(0), ps2.sum(0)


def backward_apply(dy, y, x, a, b, k, dx, dims, activation: int, slope: float):
    """dx = a·act'(y)·dy + b·x + k (b, k both given or both None)."""
    outer, channels, inner = dims
    positions = outer * inner
    bp, bc, warps = _tile_shape(channels, inner, gpu_tiles(dy))
    backward_apply_kernel.launch((triton.cdiv(positions, bp), triton.cdiv(channels, bc)), dy.device, dy,
                                 dy if y is None else y, dy if x is None else x, a, a if b is None else b,
                                 a if k is None else k, dx, positions, channels, inner, slope, ACT=activation,
                                 HAS_BK=b is not None, BP=bp, BC=bc, num_warps=warps)
    return dx


def _aot_configs():
    """bf16 storage, both layouts (NCHW: BC = 1; channels_last with 64+ channels), every feature on."""
    configs = []
    ptrs = {n: "*bf16" for n in ("X", "R", "Y", "DY", "DZ", "DX")}
    ptrs.update({n: "*fp32" for n in ("PMEAN", "PM2", "PCOUNT", "SCALE", "SHIFT", "MEAN", "PS1", "PS2", "A", "B",
                                      "K")})
    for layout, (channels, inner) in (("nchw", (64, 3136)), ("channels_last", (256, 1))):
        bp, bc, warps = _tile_shape(channels, inner, True)
        for kernel, flags in ((stats_kernel, {}),
                              (apply_kernel, dict(ACT=RELU, HAS_R=True, HAS_SCALE=True, HAS_SHIFT=True)),
                              (backward_reduce_kernel, dict(ACT=RELU, HAS_X=True, HAS_DZ=True)),
                              (backward_apply_kernel, dict(ACT=LEAKY_RELU, HAS_BK=True))):
            constexprs = {**flags, "BP": bp, "BC": bc}
            configs.append(AOTConfig(kernel, aot_signature(kernel, ptrs, constexprs, floats=("slope",)), constexprs,
                                     num_warps=warps, label=f"{kernel.__name__} {layout} {bp}x{bc} w{warps}"))
    return configs


AOT_CONFIGS = _aot_configs()
