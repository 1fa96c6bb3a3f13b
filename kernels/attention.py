"""Triton flash attention (the `triton` backend of dlcore/ops/attention.py), FlashAttention-2 style.

v1 (shipped):
- forward: one program per (query block, batch·head); loop over the key blocks the mask can reach (window/causal
  bounds skip the rest), online softmax in base 2 with fp32 statistics, P·V with P cast to V's dtype (tensor cores
  on a GPU); saves the natural-log log-sum-exp per row. Rows with no visible key give O = 0 and lse = -inf.
- backward: Δ = rowsum(dO∘O) is computed by the launcher; kernel 1 (one program per key block and query head)
  accumulates dK, dV over the query blocks; kernel 2 (one program per query block) accumulates dQ and, when the
  additive bias needs a gradient, writes dS. Neither uses atomics, so the backward is deterministic. GQA: kernel 1
  writes per-query-head fp32 partials that the launcher sums over each group.
- masks: top-left aligned window (key j visible from row i iff i - left <= j <= i + right; causal is right = 0, as
  torch's is_causal), per-batch key lengths (padding / packed sequences), an additive bias of any broadcast shape
  (passed as an expanded view: broadcast dimensions have stride 0).
- split-key forward for decoding (a KV-cache step: at most SPLIT_ROWS query rows, few batch·heads on a GPU): the
  plain forward would run B·H programs, each walking every key alone, on a GPU with ~130 SMs. Instead programs
  (split, b·h) each reduce one chunk of the keys for all the rows to unnormalised partials (m, l, acc) in fp32,
  and a combine kernel merges the chunks (M = max m_s; l = Σ l_s·2^(m_s−M); O = Σ acc_s·2^(m_s−M) / l), the
  flash-decoding scheme. Same masks, bias, dropout counters, O and lse as the plain forward, so the backward is
  shared. Chosen by `decode_splits` from the device's SM count; never on the CPU (tests force it there).
- dropout: Philox4x32-10 with key = the seed's two 32-bit halves and counter (j, i, b·H + h, 0); an element is kept
  iff the first output word ≥ threshold = round(p·2³²). Regenerated in backward, never stored; the reference and
  the C++ twin compute the same words, so all backends drop the same elements.

Formulas (s = scale·q·kᵀ + bias, P = softmax(s), Pd = P∘keep/(1-p), O = Pd·V):
  dV = Pdᵀ·dO;  dPd = dO·Vᵀ;  dP = dPd∘keep/(1-p);  dS = P∘(dP - Δ) with Δ_i = Σ_j P_ij dP_ij = rowsum(dO∘O);
  dQ = scale·dS·K;  dK = scale·dSᵀ·Q;  dbias = dS (summed over the bias's broadcast dimensions).
Δ is taken from the stored O (in the input's dtype), as FlashAttention does: one pass over dO and O, not over
every key. In 16-bit that adds −P∘δΔ to dS with δΔ_i = Σ_d dO_id·(O₁₆ − O)_id, which with few query rows can
dominate dbias's error (3× the all-16-bit reference's in one draw of 800); tests compare against float64 of this
algorithm as well as of the exact one.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dlcore.kernels import _triton
from dlcore.kernels._triton import (AOTConfig, aot_signature, dual_helper, dual_kernel, gpu_tiles, max_combine,
                                    philox4x32_10, sum_combine)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dual_helper
def _dropout_keep(seed, rows, cols, bh, threshold):
    """Philox4x32-10 keep mask for a [rows × cols] tile (see the module docstring for the counter layout)."""
    c0 = cols[None, :].to(tl.uint32) + (rows[:, None] * 0).to(tl.uint32)
    c1 = rows[:, None].to(tl.uint32) + (cols[None, :] * 0).to(tl.uint32)
    c2 = c0 * 0 + bh.to(tl.uint32)
    word, _, _, _ = philox4x32_10(c0, c1, c2, c0 * 0, seed)
    return word.to(tl.int64) >= threshold


@dual_helper
def _scores(q, k, rows, cols, klen, LQ, LK, BIAS, sbm, sbn, scale_log2, WIN_L, WIN_R, HAS_BIAS: tl.constexpr,
            PRECISION: tl.constexpr):
    """s·log2(e) for a [rows × cols] tile, -inf where the mask hides the key."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    visible = (cols[None, :] < klen) & (rows[:, None] >= 0)
    if WIN_R >= 0:
        visible = visible & (cols[None, :] <= rows[:, None] + WIN_R)
    if WIN_L >= 0:
        visible = visible & (cols[None, :] >= rows[:, None] - WIN_L)
    if HAS_BIAS:
        in_range = (rows[:, None] < LQ) & (cols[None, :] < LK)
        bias = tl.load(BIAS + rows[:, None] * sbm + cols[None, :] * sbn, mask=in_range, other=0.0)
        s = s + bias.to(tl.float32) * 1.4426950408889634
    return tl.where(visible, s, float("-inf"))


@dual_helper
def _key_range(KLEN, b, LK, pid_m, WIN_L, WIN_R, HAS_KLEN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """(keys of batch b, first key block start, key end) that query block pid_m can see."""
    klen = LK
    if HAS_KLEN:
        klen = tl.load(KLEN + b)
    lo = 0
    hi = klen
    if WIN_R >= 0:
        hi = tl.minimum(hi, pid_m * BM + BM + WIN_R)
    if WIN_L >= 0:
        lo = tl.maximum(0, pid_m * BM - WIN_L) // BN * BN
    return klen, lo, hi


@dual_kernel
def attention_forward_kernel(Q, K, V, O, LSE, BIAS, KLEN,
                             sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sbb, sbh, sbm, sbn,
                             H, GROUP, LQ, LK, D, scale_log2, WIN_L, WIN_R, seed, threshold, drop_scale,
                             HAS_BIAS: tl.constexpr, HAS_KLEN: tl.constexpr, DROPOUT: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # (head, batch) on grid axes 1 and 2: each may reach 65535, their product past it
    b = tl.program_id(2)
    bh = (b * H + h).to(tl.int64)  # int64: bh·LQ·LK offsets pass 2³¹ once B·H passes 65535
    hk = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=(rows[:, None] < LQ) & dmask,
                other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    bias_base = BIAS + b * sbb + h * sbh
    klen, lo, hi = _key_range(KLEN, b, LK, pid_m, WIN_L, WIN_R, HAS_KLEN, BM, BN)
    m_i, l_i, acc = _online_softmax(q, k_base, v_base, bias_base, rows, lo, hi, klen, bh, skn, svn, sbm, sbn, LQ, LK,
                                    D, scale_log2, WIN_L, WIN_R, seed, threshold, drop_scale, HAS_BIAS, DROPOUT,
                                    BM, BN, BD, PRECISION)
    _store_output(O + b * sob + h * soh, LSE + bh * LQ, m_i, l_i, acc, rows, som, LQ, D, BD)


@dual_helper
def _online_softmax(q, k_base, v_base, bias_base, rows, lo, hi, klen, bh, skn, svn, sbm, sbn, LQ, LK, D, scale_log2,
                    WIN_L, WIN_R, seed, threshold, drop_scale, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """(m, l, acc) over keys [lo, hi) in BN blocks: row max (base 2), Σ 2^(s−m), Σ 2^(s−m)·keep/(1−p)·v."""
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.full([BM], 0.0, tl.float32)
    acc = tl.full([BM, BD], 0.0, tl.float32)
    for start_n in range(lo, hi, BN):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < klen) & dmask
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k, rows, cols, klen, LQ, LK, bias_base, sbm, sbn, scale_log2, WIN_L, WIN_R, HAS_BIAS,
                    PRECISION)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, max_combine))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, sum_combine)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, rows, cols, bh, threshold), p * drop_scale, 0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@dual_helper
def _store_output(o_base, lse_base, m_i, l_i, acc, rows, som, LQ, D, BD: tl.constexpr):
    """O = acc / l and lse = (m + log2 l)·ln 2 for the rows < LQ; rows that saw no key: O = 0, lse = −inf."""
    offs_d = tl.arange(0, BD)
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_base + rows[:, None] * som + offs_d[None, :], o.to(o_base.dtype.element_ty),
             mask=(rows[:, None] < LQ) & (offs_d[None, :] < D))
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_base + rows, lse, mask=rows < LQ)


@dual_kernel
def attention_split_forward_kernel(Q, K, V, PART_ACC, PART_ML, BIAS, KLEN,
                                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn,
                                   H, GROUP, LQ, LK, D, scale_log2, WIN_L, WIN_R, seed, threshold, drop_scale,
                                   CHUNK, SPLITS, HAS_BIAS: tl.constexpr, HAS_KLEN: tl.constexpr,
                                   DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                                   PRECISION: tl.constexpr):
    """Program (split, b·h): every row (LQ ≤ BM) over keys [split·CHUNK, (split+1)·CHUNK) ∩ what the rows can see;
    writes its unnormalised (acc [BM, BD], m [BM], l [BM]) partials."""
    split = tl.program_id(0)
    bh = tl.program_id(1)  # (b·h on one axis: this path runs only while B·H programs leave the GPU's SMs idle)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :],
                mask=(rows[:, None] < LQ) & (offs_d[None, :] < D), other=0.0)
    klen, lo, hi = _key_range(KLEN, b, LK, 0, WIN_L, WIN_R, HAS_KLEN, BM, BN)
    lo = tl.maximum(lo, split * CHUNK)  # both multiples of BN
    hi = tl.minimum(hi, split * CHUNK + CHUNK)
    m_i, l_i, acc = _online_softmax(q, K + b * skb + hk * skh, V + b * svb + hk * svh, BIAS + b * sbb + h * sbh,
                                    rows, lo, hi, klen, bh, skn, svn, sbm, sbn, LQ, LK, D, scale_log2, WIN_L, WIN_R,
                                    seed, threshold, drop_scale, HAS_BIAS, DROPOUT, BM, BN, BD, PRECISION)
    part = bh.to(tl.int64) * SPLITS + split
    tl.store(PART_ACC + part * BM * BD + rows[:, None] * BD + offs_d[None, :], acc)
    tl.store(PART_ML + part * 2 * BM + rows, m_i)
    tl.store(PART_ML + part * 2 * BM + BM + rows, l_i)


@dual_kernel
def attention_split_combine_kernel(PART_ACC, PART_ML, O, LSE, sob, soh, som, H, LQ, D, SPLITS,
                                   BM: tl.constexpr, BD: tl.constexpr):
    """Program b·h: the SPLITS partials merged, M = max m_s, l = Σ l_s·2^(m_s−M), acc = Σ acc_s·2^(m_s−M)."""
    bh = tl.program_id(0)
    rows = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.full([BM], 0.0, tl.float32)
    acc = tl.full([BM, BD], 0.0, tl.float32)
    for split in range(0, SPLITS):
        part = bh.to(tl.int64) * SPLITS + split
        m_s = tl.load(PART_ML + part * 2 * BM + rows)
        l_s = tl.load(PART_ML + part * 2 * BM + BM + rows)
        acc_s = tl.load(PART_ACC + part * BM * BD + rows[:, None] * BD + offs_d[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # neither has seen a key: both factors 0
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    _store_output(O + (bh // H) * sob + (bh % H) * soh, LSE + bh * LQ, m_i, l_i, acc, rows, som, LQ, D, BD)


@dual_kernel
def attention_backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, KLEN,
                                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn,
                                   H, GROUP, LQ, LK, D, scale, scale_log2, WIN_L, WIN_R, seed, threshold, drop_scale,
                                   HAS_BIAS: tl.constexpr, HAS_KLEN: tl.constexpr, DROPOUT: tl.constexpr,
                                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)  # (head, batch) on grid axes 1 and 2: each may reach 65535, their product past it
    b = tl.program_id(2)
    bh = (b * H + h).to(tl.int64)  # int64: bh·LQ·LK offsets pass 2³¹ once B·H passes 65535
    hk = h // GROUP
    cols = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    klen = LK
    if HAS_KLEN:
        klen = tl.load(KLEN + b)
    kv_mask = (cols[:, None] < klen) & dmask
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    bias_base = BIAS + b * sbb + h * sbh
    lo = 0
    hi = LQ
    if WIN_R >= 0:
        lo = tl.maximum(0, pid_n * BN - WIN_R) // BM * BM
    if WIN_L >= 0:
        hi = tl.minimum(hi, pid_n * BN + BN + WIN_L)
    dk = tl.full([BN, BD], 0.0, tl.float32)
    dv = tl.full([BN, BD], 0.0, tl.float32)
    for start_m in range(lo, hi, BM):
        rows = start_m + offs_m
        row_mask = rows < LQ
        q = tl.load(q_base + rows[:, None] * sqm + offs_d[None, :], mask=row_mask[:, None] & dmask, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :], mask=row_mask[:, None] & dmask, other=0.0)
        lse = tl.load(LSE + bh * LQ + rows, mask=row_mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: P = exp(s - inf) = 0
        delta = tl.load(DELTA + bh * LQ + rows, mask=row_mask, other=0.0)
        s = _scores(q, k, rows, cols, klen, LQ, LK, bias_base, sbm, sbn, scale_log2, WIN_L, WIN_R, HAS_BIAS,
                    PRECISION)
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, rows, cols, bh, threshold)
            pd = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            pd = p
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = bh.to(tl.int64) * LK * D + cols[:, None] * D + offs_d[None, :]
    out_mask = (cols[:, None] < LK) & dmask
    tl.store(DK + out, dk * scale, mask=out_mask)
    tl.store(DV + out, dv, mask=out_mask)


@dual_kernel
def attention_backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DBIAS, BIAS, KLEN,
                                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn,
                                 H, GROUP, LQ, LK, D, scale, scale_log2, WIN_L, WIN_R, seed, threshold, drop_scale,
                                 HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, HAS_KLEN: tl.constexpr,
                                 DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                                 PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # (head, batch) on grid axes 1 and 2: each may reach 65535, their product past it
    b = tl.program_id(2)
    bh = (b * H + h).to(tl.int64)  # int64: bh·LQ·LK offsets pass 2³¹ once B·H passes 65535
    hk = h // GROUP
    rows = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d[None, :] < D
    row_mask = rows < LQ
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=row_mask[:, None] & dmask,
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdm + offs_d[None, :], mask=row_mask[:, None] & dmask,
                 other=0.0)
    lse = tl.load(LSE + bh * LQ + rows, mask=row_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh * LQ + rows, mask=row_mask, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    bias_base = BIAS + b * sbb + h * sbh
    klen, lo, hi = _key_range(KLEN, b, LK, pid_m, WIN_L, WIN_R, HAS_KLEN, BM, BN)
    dq = tl.full([BM, BD], 0.0, tl.float32)
    for start_n in range(lo, hi, BN):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < klen) & dmask
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k, rows, cols, klen, LQ, LK, bias_base, sbm, sbn, scale_log2, WIN_L, WIN_R, HAS_BIAS,
                    PRECISION)
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rows, cols, bh, threshold), dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(DBIAS + bh.to(tl.int64) * LQ * LK + rows[:, None] * LK + cols[None, :], ds,
                     mask=row_mask[:, None] & (cols[None, :] < LK))
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + bh.to(tl.int64) * LQ * D + rows[:, None] * D + offs_d[None, :], dq * scale,
             mask=row_mask[:, None] & dmask)


# ---------------------------------------------------------------------------------------------------- launchers
def _head_class(d: int) -> int:
    """BD: the head dim rounded up to a power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def _blocks(kernel: str, d: int, heavy: bool, on_gpu: bool, fp32: bool = False) -> tuple[int, int, int, int]:
    """(BM, BN, BD, num_warps) of `kernel` ("forward", "dkdv" or "dq") for head dim d: its GPU_TABLE (16-bit
    inputs) or GPU_TABLE_FP32 entry on a GPU (each compiled for sm_90 without spills by tests/test_static_gpu.py),
    large tiles for the interpreter (its cost is per program)."""
    bd = _head_class(d)
    if not on_gpu:
        return 64, 64, bd, 4
    bm, bn, warps = (GPU_TABLE_FP32 if fp32 else GPU_TABLE)[kernel][(bd, heavy)]
    return bm, bn, bd, warps


def gpu_supports(dtype: torch.dtype, d: int) -> bool:
    """Whether the GPU tables hold tiles for this input dtype and head dim (fp32: up to 64; see GPU_TABLE_FP32)."""
    return (_head_class(d), False) in (GPU_TABLE_FP32 if dtype == torch.float32 else GPU_TABLE)["forward"]


def dot_precision(dtype: torch.dtype) -> str:
    """The dots' input precision: torch's matmul setting, as torch's SDPA follows (see _triton.dot_precision)."""
    return _triton.dot_precision(dtype, torch.backends.cuda.matmul.allow_tf32)


# kernel → (head-dim class, heavy) → (BM, BN, num_warps), each kernel its own tiles: the backward kernels hold
# more live tiles than the forward, and one table for all three had held the forward at d 128 to 32×32 tiles on
# mma.sync (HMMA: Hopper's slow path) where 128×64 compiles to wgmma without spills. BD = head dim rounded up to a
# power of two (80, 96 → 128; 192 → 256); "heavy" = an additive bias, key lengths or dropout (more live
# registers). Entries: `python -m dlcore._static_check --search-attention` (2026-12-01, triton 3.9, sm_90,
# NUM_STAGES): the largest BM·BN of TILE_CANDIDATES that compiles with no spill and at most 243 registers in both
# builds the runtime makes (integer arguments unspecialised and multiples of 16; _static_check.builds), wgmma over
# mma.sync at equal area, then the taller tile along the kernel's own loop-invariant axis (queries for forward and
# dq, keys for dkdv). Not timed on a GPU yet: `make gpu-check` measures them.
GPU_TABLE = {
    "forward": {(16, False): (128, 128, 8), (16, True): (64, 32, 8), (32, False): (128, 64, 8),
                (32, True): (64, 32, 8), (64, False): (128, 128, 8), (64, True): (64, 32, 8),
                (128, False): (128, 64, 8), (128, True): (64, 32, 8), (256, False): (32, 32, 8),
                (256, True): (32, 32, 8)},
    "dkdv": {(16, False): (128, 64, 8), (16, True): (64, 64, 8), (32, False): (128, 64, 8), (32, True): (64, 64, 8),
             (64, False): (32, 64, 4), (64, True): (64, 32, 8), (128, False): (32, 32, 8),
             (128, True): (32, 32, 8), (256, False): (32, 32, 8), (256, True): (32, 16, 8)},
    "dq": {(16, False): (128, 128, 8), (16, True): (64, 64, 8), (32, False): (128, 64, 8), (32, True): (64, 32, 8),
           (64, False): (128, 128, 8), (64, True): (64, 32, 8), (128, False): (64, 32, 8), (128, True): (32, 32, 8),
           (256, False): (32, 16, 4), (256, True): (32, 16, 8)},
}
# fp32 inputs (the same search with `--fp32`, every build in both dot precisions: 3×TF32 and TF32): fp32 tiles take
# twice the shared memory, and 3×TF32 splits each operand in two, so the 16-bit table's tiles spill or overflow
# shared memory (d64 forward 128×128: 168 B spilled, 229 KB shared). Up to head dim 64 only: at 128 no candidate of
# the dK/dV kernel compiled clean (each spilled or overflowed), so fp32 with larger heads runs the reference by
# default on a GPU (gpu_supports), and the triton backend asked for by name refuses it.
GPU_TABLE_FP32 = {
    "forward": {(16, False): (128, 64, 8), (16, True): (64, 32, 8), (32, False): (128, 64, 8),
                (32, True): (64, 32, 8), (64, False): (32, 32, 8), (64, True): (32, 32, 8)},
    "dkdv": {(16, False): (32, 64, 4), (16, True): (32, 64, 4), (32, False): (32, 64, 4), (32, True): (32, 16, 8),
             (64, False): (16, 16, 8), (64, True): (16, 16, 4)},
    "dq": {(16, False): (128, 64, 8), (16, True): (64, 32, 8), (32, False): (128, 64, 8), (32, True): (64, 32, 8),
           (64, False): (16, 16, 4), (64, True): (32, 32, 8)},
}
TILE_CANDIDATES = [(128, 128, 8), (128, 64, 8), (128, 64, 4), (128, 32, 4), (64, 128, 8), (64, 64, 8), (64, 64, 4),
                   (64, 32, 8), (64, 32, 4), (32, 64, 4), (32, 32, 8), (32, 32, 4), (32, 16, 8), (32, 16, 4),
                   (16, 16, 8), (16, 16, 4)]
NUM_STAGES = 3  # the launches pass it, so the configurations checked ahead of time are the ones that run


def _heavy(bias, klen, dropout_p) -> bool:
    return bias is not None or klen is not None or dropout_p > 0


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q, k, bias, klen, scale, window, dropout_p, seed):
    b, h, lq, d = q.shape
    if b > 65535 or h > 65535:  # grid axes 1 (heads) and 2 (sequences): CUDA's limit on each
        raise ValueError(f"the Triton attention takes at most 65535 sequences and 65535 heads per call, got "
                         f"B={b}, H={h}")
    hk, lk = k.shape[1], k.shape[2]
    threshold = min(int(round(dropout_p * 2 ** 32)), 2 ** 32)
    drop_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    args = dict(H=h, GROUP=h // hk, LQ=lq, LK=lk, D=d, WIN_L=window[0], WIN_R=window[1], seed=seed,
                threshold=threshold, drop_scale=drop_scale, scale_log2=scale * LOG2E,
                HAS_BIAS=bias is not None, HAS_KLEN=klen is not None, DROPOUT=dropout_p > 0,
                PRECISION=dot_precision(q.dtype))
    return args, bias_strides


SPLIT_ROWS = 16  # query rows the split-key forward takes (its tile height: tl.dot's smallest M)
SPLIT_WAVES = 2  # split until the (split, b·h) programs fill about this many waves of the SMs
MAX_SPLITS = 64


def _sm_count(device: torch.device):
    """Streaming multiprocessors of a CUDA device; None on the CPU (no split-key forward there)."""
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:  # asked once per device, not on every forward
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(batch_heads: int, lq: int, lk: int, bn: int, device: torch.device) -> int:
    """How many key chunks the forward splits into: 1 (the plain forward) unless at most SPLIT_ROWS query rows
    leave the B·H programs short of SPLIT_WAVES waves of the device's SMs; then enough chunks of at least one key
    block each to fill them."""
    if lq > SPLIT_ROWS:  # a prefill or training forward: no device query
        return 1
    sms = _sm_count(device)
    if not sms:
        return 1
    return max(1, min(triton.cdiv(lk, bn), triton.cdiv(SPLIT_WAVES * sms, batch_heads), MAX_SPLITS))


def _split_blocks(d: int, on_gpu: bool, fp32: bool = False) -> tuple[int, int, int]:
    """(BN, BD, num_warps) of the split-key forward: BM = SPLIT_ROWS; see SPLIT_TABLE."""
    bd = _head_class(d)
    bn, warps = (SPLIT_TABLE_FP32 if fp32 else SPLIT_TABLE)[bd] if on_gpu else (64, 4)
    return bn, bd, warps


# head-dim class → (BN, num_warps) of the split-key forward (BM = 16): the largest key block, then the fewest
# registers, among BN 64/32/16 × 4/8 warps that compile for sm_90 without a spill with every feature on and off
# (searched 2026-12-01 with dlcore._static_check: at 4 warps d128 BN 64 and d256 BN 32 spill with bias, key lengths
# and dropout on). Not timed on a GPU yet.
SPLIT_TABLE = {16: (64, 4), 32: (64, 4), 64: (64, 8), 128: (64, 8), 256: (32, 8)}
SPLIT_TABLE_FP32 = {16: (32, 8), 32: (64, 8), 64: (32, 8)}  # fp32 inputs, as GPU_TABLE_FP32 up to head dim 64


def forward(q, k, v, bias, klen, scale: float, window: tuple[int, int], dropout_p: float, seed: int):
    """q [B,H,Lq,D], k/v [B,Hk,Lk,D] (last dim contiguous), bias None or a [B,H,Lq,Lk] view, klen None or int32 [B].
    Returns (o [B,H,Lq,D] contiguous in q's dtype, lse fp32 [B,H,Lq])."""
    b, h, lq, d = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    args, sb = _common(q, k, bias, klen, scale, window, dropout_p, seed)
    bias_arg, klen_arg = (q if bias is None else bias), (q if klen is None else klen)
    bn, bd, warps = _split_blocks(d, gpu_tiles(q), q.dtype == torch.float32)
    splits = decode_splits(b * h, lq, k.shape[2], bn, q.device)
    if splits > 1:
        chunk = triton.cdiv(triton.cdiv(k.shape[2], splits), bn) * bn  # whole key blocks per split
        splits = triton.cdiv(k.shape[2], chunk)
        part_acc = torch.empty((b * h, splits, SPLIT_ROWS, bd), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((b * h, splits, 2, SPLIT_ROWS), dtype=torch.float32, device=q.device)
        attention_split_forward_kernel.launch((splits, b * h), q.device, q, k, v, part_acc, part_ml, bias_arg,
                                              klen_arg, *_strides(q), *_strides(k), *_strides(v), *sb,
                                              CHUNK=chunk, SPLITS=splits, BM=SPLIT_ROWS, BN=bn, BD=bd,
                                              num_warps=warps, num_stages=NUM_STAGES, **args)
        attention_split_combine_kernel.launch((b * h,), q.device, part_acc, part_ml, o, lse, *_strides(o), H=h, LQ=lq,
                                              D=d, SPLITS=splits, BM=SPLIT_ROWS, BD=bd, num_warps=4,
                                              num_stages=NUM_STAGES)
        return o, lse
    bm, bn, bd, warps = _blocks("forward", d, _heavy(bias, klen, dropout_p), gpu_tiles(q), q.dtype == torch.float32)
    attention_forward_kernel.launch((triton.cdiv(lq, bm), h, b), q.device, q, k, v, o, lse, bias_arg, klen_arg,
                                    *_strides(q), *_strides(k), *_strides(v), *_strides(o), *sb,
                                    BM=bm, BN=bn, BD=bd, num_warps=warps, num_stages=NUM_STAGES, **args)
    return o, lse


def backward(do, q, k, v, o, lse, bias, bias_grad: bool, klen, scale, window, dropout_p, seed):
    """Gradients (dq, dk, dv, dbias_full or None); dbias_full is dS as fp32 [B,H,Lq,Lk]."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    delta = (do.float() * o.float()).sum(-1)  # Δ = rowsum(dO∘O), fp32 [B,H,Lq]
    dq = torch.empty((b, h, lq, d), dtype=torch.float32, device=q.device)
    dk = torch.empty((b, h, lk, d), dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    # zeros: blocks the window or key lengths skip are never written
    dbias = torch.zeros((b, h, lq, lk), dtype=torch.float32, device=q.device) if bias_grad else None
    heavy = _heavy(bias, klen, dropout_p)
    args, sb = _common(q, k, bias, klen, scale, window, dropout_p, seed)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *sb)
    bias_arg, klen_arg = (q if bias is None else bias), (q if klen is None else klen)
    bm, bn, bd, warps = _blocks("dkdv", d, heavy, gpu_tiles(q), q.dtype == torch.float32)
    attention_backward_dkdv_kernel.launch((triton.cdiv(lk, bn), h, b), q.device, q, k, v, do, lse, delta, dk, dv,
                                          bias_arg, klen_arg, *common, scale=scale, BM=bm, BN=bn, BD=bd,
                                          num_warps=warps, num_stages=NUM_STAGES, **args)
    bm, bn, bd, warps = _blocks("dq", d, heavy, gpu_tiles(q), q.dtype == torch.float32)
    attention_backward_dq_kernel.launch((triton.cdiv(lq, bm), h, b), q.device, q, k, v, do, lse, delta, dq,
                                        q if dbias is None else dbias, bias_arg, klen_arg, *common, scale=scale,
                                        BIAS_GRAD=bias_grad, BM=bm, BN=bn, BD=bd, num_warps=warps,
                                        num_stages=NUM_STAGES, **args)
    if hk != h:  # GQA: each kv head's gradient is the sum over its group of query heads
        dk, dv = (t.view(b, hk, h // hk, lk, d).sum(2) for t in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


# ---------------------------------------------------------------------------------------------------- AOT configs
_KERNELS = {"forward": attention_forward_kernel, "dkdv": attention_backward_dkdv_kernel,
            "dq": attention_backward_dq_kernel}
_STATS = {"LSE": "*fp32", "DELTA": "*fp32", "DQ": "*fp32", "DK": "*fp32", "DV": "*fp32", "DBIAS": "*fp32",
          "KLEN": "*i32", "PART_ACC": "*fp32", "PART_ML": "*fp32"}


def _io(fp32: bool) -> dict:
    """Pointer types: q, k, v, o, dO and the bias in bf16 (fp16 compiles to the same register budget) or fp32."""
    return {**{n: "*fp32" if fp32 else "*bf16" for n in ("Q", "K", "V", "O", "DO", "BIAS")}, **_STATS}


def _precisions(fp32: bool) -> tuple[str, ...]:
    return _triton.FP32_DOT_PRECISIONS if fp32 else ("ieee",)  # dot_precision's choices for the dtype


def aot_config(kernel: str, bd: int, heavy: bool, bm: int, bn: int, warps: int, precision: str = "ieee"
               ) -> AOTConfig:
    """The configuration of `kernel` ("forward", "dkdv", "dq") at one tile; "heavy" with every optional feature
    switched on (the worst case for registers); precision "ieee" for 16-bit inputs, "tf32x3"/"tf32" for fp32."""
    fn = _KERNELS[kernel]
    constexprs = dict(HAS_BIAS=heavy, HAS_KLEN=heavy, DROPOUT=heavy, BM=bm, BN=bn, BD=bd, PRECISION=precision,
                      **({"BIAS_GRAD": heavy} if kernel == "dq" else {}))
    sig = aot_signature(fn, _io(precision != "ieee"), constexprs, floats=("scale", "scale_log2", "drop_scale"),
                        int64s=("seed", "threshold"))
    return AOTConfig(fn, sig, constexprs, num_warps=warps, num_stages=NUM_STAGES,
                     label=f"{fn.__name__} {precision} d{bd}{' heavy' if heavy else ''} {bm}x{bn} w{warps}")


def _split_config(bd: int, heavy: bool, bn: int, warps: int, precision: str) -> AOTConfig:
    constexprs = dict(HAS_BIAS=heavy, HAS_KLEN=heavy, DROPOUT=heavy, BM=SPLIT_ROWS, BN=bn, BD=bd, PRECISION=precision)
    sig = aot_signature(attention_split_forward_kernel, _io(precision != "ieee"), constexprs,
                        floats=("scale_log2", "drop_scale"), int64s=("seed", "threshold"))
    return AOTConfig(attention_split_forward_kernel, sig, constexprs, num_warps=warps, num_stages=NUM_STAGES,
                     label=f"attention_split_forward_kernel {precision} d{bd}{' heavy' if heavy else ''} "
                           f"{SPLIT_ROWS}x{bn} w{warps}")


def _aot_configs():
    """Every entry of GPU_TABLE and GPU_TABLE_FP32 (each fp32 dot precision), then the split-key forward (both
    tables) and its combine."""
    configs = [aot_config(kernel, bd, heavy, *tile, precision)
               for fp32, tables in ((False, GPU_TABLE), (True, GPU_TABLE_FP32)) for precision in _precisions(fp32)
               for kernel, table in tables.items() for (bd, heavy), tile in table.items()]
    for fp32, table in ((False, SPLIT_TABLE), (True, SPLIT_TABLE_FP32)):
        for precision in _precisions(fp32):
            configs += [_split_config(bd, heavy, bn, warps, precision) for bd, (bn, warps) in table.items()
                        for heavy in (False, True)]
    for bd in SPLIT_TABLE:
        constexprs = dict(BM=SPLIT_ROWS, BD=bd)
        sig = aot_signature(attention_split_combine_kernel, _io(False), constexprs)
        configs.append(AOTConfig(attention_split_combine_kernel, sig, constexprs, num_warps=4, num_stages=NUM_STAGES,
                                 label=f"attention_split_combine_kernel d{bd}"))
    return configs


AOT_CONFIGS = _aot_configs()
