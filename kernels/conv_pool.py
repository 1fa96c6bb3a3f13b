"""Triton kernels of conv2d_relu_maxpool2d: the `triton` backend of dlcore/ops/conv_pool.py.

v2 (shipped for groups = 1): fused_forward_kernel, an implicit-GEMM convolution with the pool, bias and ReLU in its
epilogue; the un-pooled activation never reaches global memory.
- A program owns BM pooled outputs × BN output channels. For each offset (a, e) of the pool window it computes the
  convolution at the window's position for all BM outputs as a GEMM, acc[BM, BN] = Σ_k A[m, k]·B[k, n] over
  k = (r, s, ci), A gathered from x on the fly (im2col never built; padding and the pool's −∞ border are masks),
  B = the weight as [KH·KW·Cin, Cout]; then keeps the running max and its window offset. Overlapping windows
  (AlexNet's 3×3/2) recompute shared positions: (KH·KW)/(SH·SW) = 2.25× the convolution's FLOPs, traded for never
  writing or re-reading the full-size activation.
- x and y are read and written through their strides: NCHW and channels_last alike, no layout copies.
- fp32 inputs use tf32 tensor cores (input_precision="tf32") as torch's cuDNN convolutions do by default, or
  3×TF32 (fp32-grade) when torch.backends.cudnn.allow_tf32 is off; bf16/fp16 their own; fp32 accumulation.
v1 (still used for grouped convolutions, and for backward): torch's convolution, then the pool epilogue below.
z is the bias-free convolution output in channels_last ([N, H, W, C] in memory); pooled outputs [N, OH, OW, C].
- forward: a program per (BP output positions × BC channels) tile; the KH×KW window unrolled (constexpr), −∞
  outside the input, strict > keeps the first maximum (NaN wins, as torch), then y = relu(max + b) and the window
  offset of the argmax as a byte.
- backward without atomics (deterministic): a program per (BP input positions × BC channels) tile gathers, for each
  input position, g = dy·[y > 0] from the at most ⌈KH/SH⌉·⌈KW/SW⌉ windows that contain it and whose argmax it is;
  a second kernel sums g per channel into per-program partials for the bias gradient (the launcher adds them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcore.kernels._triton import (FP32_DOT_PRECISIONS, AOTConfig, aot_signature, dot_precision, dual_helper,
                                    dual_kernel, gpu_tiles, sum_combine)


@dual_helper
def _fold_max(v, best, best_k, k):
    """One more window element into the running max: strict > keeps the first maximum, a NaN wins (as torch)."""
    take = (v > best) | ((v != v) & (best == best))
    return tl.where(take, v, best), tl.where(take, k, best_k)


@dual_helper
def _bias_relu_store(best, best_k, BIAS, Y, ARG, out, channels, cmask, mask, HAS_BIAS: tl.constexpr,
                     STORE_ARG: tl.constexpr):
    """y = relu(max + b) (NaN kept) and, when STORE_ARG (a backward can follow), the argmax byte, at element
    offsets `out`."""
    if HAS_BIAS:
        best += tl.load(BIAS + channels, mask=cmask, other=0.0)[None, :]
    y = tl.where((best > 0) | (best != best), best, 0.0)
    tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)
    if STORE_ARG:
        tl.store(ARG + out, best_k.to(tl.uint8), mask=mask)


@dual_kernel
def pool_forward_kernel(Z, BIAS, Y, ARG, n_out, C, H, W, OH, OW, SH, SW, PH, PW, HAS_BIAS: tl.constexpr,
                        KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                        STORE_ARG: tl.constexpr):
    p = tl.program_id(0) * BP + tl.arange(0, BP)  # output position (n, i, j) flattened
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    pmask, cmask = p < n_out, c < C
    j = p % OW
    i = (p // OW) % OH
    n = p // (OW * OH)
    best = tl.full([BP, BC], -float("inf"), tl.float32)
    best_k = tl.full([BP, BC], 0, tl.int32)
    for a in tl.static_range(KH):
        for e in tl.static_range(KW):
            h = i * SH - PH + a
            w = j * SW - PW + e
            inside = pmask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            off = ((n.to(tl.int64) * H + h) * W + w) * C
            v = tl.load(Z + off[:, None] + c[None, :], mask=inside[:, None] & cmask[None, :],
                        other=-float("inf")).to(tl.float32)
            best, best_k = _fold_max(v, best, best_k, a * KW + e)
    out = p.to(tl.int64)[:, None] * C + c[None, :]
    _bias_relu_store(best, best_k, BIAS, Y, ARG, out, c, cmask, pmask[:, None] & cmask[None, :], HAS_BIAS,
                     STORE_ARG)


@dual_kernel
def fused_forward_kernel(X, WT, BIAS, Y, ARG, M, CIN, COUT, H, W, ZH, ZW, OH, OW,
                         sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                         SH, SW, PH, PW, DH, DW, PSH, PSW, PPH, PPW,
                         KH: tl.constexpr, KW: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         PRECISION: tl.constexpr, STORE_ARG: tl.constexpr):
    m = tl.program_id(0) * BM + tl.arange(0, BM)  # pooled output (n, i, j) flattened
    co = tl.program_id(1) * BN + tl.arange(0, BN)
    mmask, nmask = m < M, co < COUT
    j = m % OW
    i = (m // OW) % OH
    img = (m // (OW * OH)).to(tl.int64)
    kk = tl.arange(0, BK)
    best = tl.full([BM, BN], -float("inf"), tl.float32)
    best_k = tl.full([BM, BN], 0, tl.int32)
    for a in range(PKH):  # a loop, not unrolled: nine copies of the GEMM loop nest spilled
        for e in range(PKW):
            zh = i * PSH - PPH + a  # the convolution output this window position reads
            zw = j * PSW - PPW + e
            zin = mmask & (zh >= 0) & (zh < ZH) & (zw >= 0) & (zw < ZW)
            acc = tl.full([BM, BN], 0.0, tl.float32)  # not tl.zeros: a @jit wrapper, interpreted in tests
            for r in range(KH):
                xh = zh * SH - PH + r * DH
                for s_ in range(KW):
                    xw = zw * SW - PW + s_ * DW
                    xin = zin & (xh >= 0) & (xh < H) & (xw >= 0) & (xw < W)
                    row = img * sxn + xh.to(tl.int64) * sxh + xw.to(tl.int64) * sxw
                    k0 = (r * KW + s_) * CIN
                    for c0 in range(0, CIN, BK):
                        ci = c0 + kk
                        cmask = ci < CIN
                        a_tile = tl.load(X + row[:, None] + ci[None, :].to(tl.int64) * sxc,
                                         mask=xin[:, None] & cmask[None, :], other=0.0)
                        b_tile = tl.load(WT + (k0 + ci)[:, None].to(tl.int64) * COUT + co[None, :],
                                         mask=cmask[:, None] & nmask[None, :], other=0.0)
                        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
            v = tl.where(zin[:, None], acc, -float("inf"))  # outside the convolution output: the pool's padding
            best, best_k = _fold_max(v, best, best_k, a * PKW + e)
    out = (img * syn + i.to(tl.int64) * syh + j.to(tl.int64) * syw)[:, None] + co[None, :].to(tl.int64) * syc
    _bias_relu_store(best, best_k, BIAS, Y, ARG, out, co, nmask, mmask[:, None] & nmask[None, :], HAS_BIAS,
                     STORE_ARG)


@dual_kernel
def pool_backward_kernel(DY, Y, ARG, DZ, n_in, C, H, W, OH, OW, SH, SW, PH, PW, KH: tl.constexpr,
                         KW: tl.constexpr, SPAN_H: tl.constexpr, SPAN_W: tl.constexpr, BP: tl.constexpr,
                         BC: tl.constexpr):
    q = tl.program_id(0) * BP + tl.arange(0, BP)  # input position (n, h, w) flattened
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    qmask, cmask = q < n_in, c < C
    w = q % W
    h = (q // W) % H
    n = q // (W * H)
    acc = tl.full([BP, BC], 0.0, tl.float32)
    i_last = (h + PH) // SH  # the last window row containing h; the earlier ones are i_last - t
    j_last = (w + PW) // SW
    for t in tl.static_range(SPAN_H):
        for u in tl.static_range(SPAN_W):
            i = i_last - t
            j = j_last - u
            a = h - (i * SH - PH)  # h's row inside window i
            e = w - (j * SW - PW)
            valid = qmask & (i >= 0) & (i < OH) & (j >= 0) & (j < OW) & (a < KH) & (e < KW)
            off = ((n.to(tl.int64) * OH + i) * OW + j) * C
            m = valid[:, None] & cmask[None, :]
            k = tl.load(ARG + off[:, None] + c[None, :], mask=m, other=255).to(tl.int32)
            yv = tl.load(Y + off[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
            g = tl.load(DY + off[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
            hit = m & (k == (a * KW + e)[:, None]) & (yv > 0)
            acc += tl.where(hit, g, 0.0)
    out = q.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(DZ + out, acc.to(DZ.dtype.element_ty), mask=qmask[:, None] & cmask[None, :])


@dual_kernel
def bias_grad_kernel(DY, Y, PDB, n_out, C, per_program, BP: tl.constexpr, BC: tl.constexpr):
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    acc = tl.full([BC], 0.0, tl.float32)
    start = tl.program_id(0) * per_program
    end = tl.minimum(start + per_program, n_out)
    for first in range(start, end, BP):
        p = first + tl.arange(0, BP)
        m = (p < end)[:, None] & cmask[None, :]
        off = p.to(tl.int64)[:, None] * C + c[None, :]
        g = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        yv = tl.load(Y + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.reduce(tl.where(yv > 0, g, 0.0), 0, sum_combine)
    tl.store(PDB + tl.program_id(0) * C + c, acc, mask=cmask)


def _tiles(channels: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BP, BC, num_warps): 2K-element tiles with 8 warps on a GPU (4 warps spill in backward: int64 offsets per
    window), 64K in the interpreter (its cost is per program)."""
    bc = min(triton.next_power_of_2(channels), 64)
    return (2048 if on_gpu else 65536) // bc, bc, 8 if on_gpu else 4


def forward(z, bias, geometry, keep_argmax: bool = True):
    """z: channels_last [N, C, H, W]; returns (y, argmax uint8), both channels_last [N, C, OH, OW] (argmax None
    when not keep_argmax: inference writes no offsets)."""
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = geometry
    y = torch.empty((n, c, oh, ow), dtype=z.dtype, device=z.device, memory_format=torch.channels_last)
    arg = torch.empty_like(y, dtype=torch.uint8) if keep_argmax else None
    bp, bc, warps = _tiles(c, gpu_tiles(z))
    pool_forward_kernel.launch((triton.cdiv(n * oh * ow, bp), triton.cdiv(c, bc)), z.device, z,
                               z if bias is None else bias, y, y if arg is None else arg, n * oh * ow, c, h, w, oh,
                               ow, sh, sw, ph, pw, HAS_BIAS=bias is not None, KH=kh, KW=kw, BP=bp, BC=bc,
                               STORE_ARG=keep_argmax, num_warps=warps)
    return y, arg


# (BM, BN, BK, num_warps) on a GPU; the interpreter takes bigger tiles (its cost is per program and per dot).
# sm_90 compile: 4 warps spilled (255 registers), 8 warps: 210 (bf16) / 237 (fp32) registers, no spills. Untuned:
# no GPU has run it yet. Channels_last is the layout it reads well (ci contiguous in the A tile).
FUSED_TILES = {"gpu": (64, 64, 32, 8), "interpreter": (128, 64, 64, 4)}


def fused_forward(x, wt, bias, y, arg, dims):
    """The implicit-GEMM fused forward (groups = 1) into y and arg (None: no argmax written); operands and the 31
    dims as dlcore/ops/conv_pool.py's fused_problem makes them."""
    m, cin, cout = dims[:3]
    kh, kw, psh, psw, pph, ppw, pkh, pkw = dims[23:]
    bm, bn, bk, warps = FUSED_TILES["gpu" if gpu_tiles(x) else "interpreter"]
    bk = min(bk, max(16, triton.next_power_of_2(cin)))
    fused_forward_kernel.launch(
        (triton.cdiv(m, bm), triton.cdiv(cout, bn)), x.device, x, wt, wt if bias is None else bias, y,
        y if arg is None else arg, *dims[:23], psh, psw, pph, ppw, KH=kh, KW=kw, PKH=pkh, PKW=pkw,
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, PRECISION=dot_precision(x.dtype, torch.backends.cudnn.allow_tf32),
        STORE_ARG=arg is not None, num_warps=warps)


def backward(grad_y, y, arg, geometry, want_bias: bool):
    """(dz channels_last [N, C, H, W] in y's dtype, db fp32 [C] or None); inputs channels_last."""
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = geometry
    dz = torch.empty((n, c, h, w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    bp, bc, warps = _tiles(c, gpu_tiles(y))
    pool_backward_kernel.launch((triton.cdiv(n * h * w, bp), triton.cdiv(c, bc)), y.device, grad_y, y, arg, dz,
                                n * h * w, c, h, w, oh, ow, sh, sw, ph, pw, KH=kh, KW=kw,
                                SPAN_H=triton.cdiv(kh, sh), SPAN_W=triton.cdiv(kw, sw), BP=bp, BC=bc,
                                num_warps=warps)
    if not want_bias:
        return dz, None
    n_out = n * oh * ow
    programs = min(triton.cdiv(n_out, bp), 64 if y.is_cuda else 2)
    per_program = triton.cdiv(triton.cdiv(n_out, programs), bp) * bp
    programs = triton.cdiv(n_out, per_program)
    partial = torch.empty((programs, c), dtype=torch.float32, device=y.device)
    bias_grad_kernel.launch((programs, triton.cdiv(c, bc)), y.device, grad_y, y, partial, n_out, c, per_program,
                            BP=bp, BC=bc, num_warps=warps)
    return dz, partial.sum(0)


def _aot_configs():
    """bf16, AlexNet's overlapping 3×3/2 pool over 64/192/256 channels."""
    bp, bc, warps = _tiles(64, True)
    ptrs = {n: "*bf16" for n in ("Z", "Y", "DY", "DZ")}
    ptrs.update(BIAS="*fp32", ARG="*u8", PDB="*fp32")
    configs = []
    for kernel, constexprs in ((pool_forward_kernel, dict(HAS_BIAS=True, KH=3, KW=3, BP=bp, BC=bc, STORE_ARG=True)),
                               (pool_backward_kernel, dict(KH=3, KW=3, SPAN_H=2, SPAN_W=2, BP=bp, BC=bc)),
                               (bias_grad_kernel, dict(BP=bp, BC=bc))):
        configs.append(AOTConfig(kernel, aot_signature(kernel, ptrs, constexprs), constexprs, num_warps=warps,
                                 label=f"{kernel.__name__} 3x3/2 {bp}x{bc} w{warps}"))
    bm, bn, bk, warps = FUSED_TILES["gpu"]
    # AlexNet conv2 (5×5, pad 2) → pool 3×3/2; fp32 in each of dot_precision's precisions
    for dtype, precision, store_arg in (("bf16", "ieee", True), *(("fp32", p, True) for p in FP32_DOT_PRECISIONS),
                                        ("bf16", "ieee", False)):
        constexprs = dict(KH=5, KW=5, PKH=3, PKW=3, HAS_BIAS=True, BM=bm, BN=bn, BK=bk, PRECISION=precision,
                          STORE_ARG=store_arg)
        ptrs = {"X": f"*{dtype}", "WT": f"*{dtype}", "BIAS": "*fp32", "Y": f"*{dtype}", "ARG": "*u8"}
        configs.append(AOTConfig(fused_forward_kernel, aot_signature(fused_forward_kernel, ptrs, constexprs),
                                 constexprs, num_warps=warps,
                                 label=f"fused implicit-GEMM conv 5x5 + pool 3x3/2 {dtype} {precision} {bm}x{bn}x{bk} "
                                       f"w{warps}"
                                       + ("" if store_arg else " (inference: no argmax)")))
    return configs


AOT_CONFIGS = _aot_configs()
