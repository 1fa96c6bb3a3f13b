"""Flash attention: O = dropout(softmax(scale·Q·Kᵀ + bias, masked)) · V, forward and backward (issue 4).

Launcher signature shared by every backend (q [B,H,Lq,D], k/v [B,Hk,Lk,D] with H a multiple of Hk, last dim
contiguous; bias None or a [B,H,Lq,Lk] view of q's dtype, broadcast dimensions of stride 0; klen None or int32 [B]
keys per batch; window (left, right), -1 = unbounded, key j visible from query i iff i - left <= j <= i + right,
aligned top-left as torch's is_causal, which is window (-1, 0)):
  forward(q, k, v, bias, klen, scale, window, dropout_p, seed) -> (o [B,H,Lq,D] q.dtype, lse fp32 [B,H,Lq])
  backward(do, q, k, v, o, lse, bias, bias_grad, klen, scale, window, dropout_p, seed) -> (dq, dk, dv, dbias|None)
lse is the natural-log log-sum-exp of each row's visible scores; a row that sees no key gives o = 0, lse = -inf.
Dropout keeps element (b, h, i, j) iff Philox4x32-10(key = seed, counter = (j, i, b·H + h, 0))[0] ≥ round(p·2³²)
(`philox_keep` below): every backend drops the same elements, and backward regenerates them.

Backends
  reference  plain PyTorch (float64 for float64 inputs, else fp32 math); backward through autograd of the same.
  triton     kernels/attention.py: FlashAttention-2 forward and two-kernel deterministic backward.
  cpu        csrc/cpu/attention.cpp: the same tiled algorithm in C++ (OpenMP, vectorised), fp32 and bf16.
  cuda       csrc/cuda/attention.cu: the same algorithm on tensor cores (WMMA), fp16/bf16, every feature of the
             contract, forward and two-kernel deterministic backward (head dims above 128: the triton backward,
             whose tiles fit); compiled for sm_80/90 without spills, not yet run on a GPU.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dlcore import _dispatch, _eager, _ext
from dlcore._philox import draw_seed, philox4x32_10

FORWARD, BACKWARD = "attention", "attention_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton", "cuda"))  # cuda unmeasured
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------- dropout RNG
def philox_keep(seed: int, batch: int, heads: int, lq: int, lk: int, dropout_p: float,
                device="cpu") -> torch.Tensor:
    """The keep mask bool [B, H, Lq, Lk] every backend uses (Philox4x32-10, 10 rounds, first output word)."""
    j = torch.arange(lk, device=device, dtype=torch.int64)
    i = torch.arange(lq, device=device, dtype=torch.int64)[:, None]
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64)[:, None, None]
    c0, c1, c2 = j + 0 * i + 0 * bh, i + 0 * j + 0 * bh, bh + 0 * i + 0 * j
    word, *_ = philox4x32_10(c0, c1, c2, torch.zeros_like(c0), seed)
    return (word >= min(round(dropout_p * 2 ** 32), 2 ** 32)).view(batch, heads, lq, lk)


def visible_mask(lq: int, lk: int, window: tuple[int, int], klen: Optional[torch.Tensor],
                 device="cpu") -> torch.Tensor:
    """bool [B or 1, 1, Lq, Lk]: which keys each query sees (window and per-batch key lengths)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    seen = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if window[1] >= 0:
        seen &= j <= i + window[1]
    if window[0] >= 0:
        seen &= j >= i - window[0]
    seen = seen[None, None]
    if klen is not None:
        seen = seen & (j < klen.to(device).long()[:, None, None, None])
    return seen


# ---------------------------------------------------------------------------------------------------- reference
def _reference_math(q, k, v, bias, klen, scale, window, dropout_p, seed, math_dtype=None, keep=None):
    """(o, lse) in `math_dtype` (default: float64 for float64 inputs, else fp32). Tests also run it in the input's
    low precision, as the error baseline a kernel must stay within 2× of. keep: a dropout keep mask [B, H, Lq, Lk]
    to use instead of the Philox one from `seed` (inside torch.func transforms, see scaled_dot_product_attention)."""
    b, h, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if math_dtype is None:
        math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (t.to(math_dtype) for t in (q, k, v))
    k, v = (t.repeat_interleave(h // hk, dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(math_dtype)
    s = s.masked_fill(~visible_mask(lq, lk, window, klen, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf"))[..., None])  # empty rows: p = 0
    if dropout_p > 0:
        if keep is None:
            keep = philox_keep(seed, b, h, lq, lk, dropout_p, q.device)
        p = p * keep * (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)
    return p @ v, lse


@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(q, k, v, bias, klen, scale, window, dropout_p, seed):
    o, lse = _reference_math(q, k, v, bias, klen, scale, window, dropout_p, seed)
    return o.to(q.dtype), lse.float() if q.dtype != torch.float64 else lse


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(do, q, k, v, o, lse, bias, bias_grad, klen, scale, window, dropout_p, seed):
    # Explicit formulas (custom ops run below autograd, so no autograd.grad here); the module docstring of
    # kernels/attention.py derives them. Tests check them against autograd of the reference forward.
    b, h, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qm, dom = q.to(math_dtype), do.to(math_dtype)
    km, vm = (t.to(math_dtype).repeat_interleave(h // hk, dim=1) for t in (k, v))
    s = (qm @ km.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(math_dtype)
    s = s.masked_fill(~visible_mask(lq, lk, window, klen, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf"))[..., None])
    dp = dom @ vm.transpose(-1, -2)                      # dPd = dO·Vᵀ
    if dropout_p > 0:
        keep = philox_keep(seed, b, h, lq, lk, dropout_p, q.device) * (1.0 / (1.0 - dropout_p) if dropout_p < 1
                                                                        else 0.0)
        pd, dp = p * keep, dp * keep                     # Pd = P∘keep/(1-p), dP = dPd∘keep/(1-p)
    else:
        pd = p
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))       # dS = P∘(dP − Δ), Δ = rowsum(P∘dP)
    dq = (ds @ km) * scale
    dk = (ds.transpose(-1, -2) @ qm) * scale
    dv = pd.transpose(-1, -2) @ dom
    if hk != h:
        dk, dv = (t.view(b, hk, h // hk, lk, -1).sum(2) for t in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (ds if bias_grad else None)


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float16,
                    torch.bfloat16), available=_ext.triton_unavailable("attention"))
def triton_forward(*args):
    from dlcore.kernels import attention

    return attention.forward(*args)


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float16,
                    torch.bfloat16), available=_ext.triton_unavailable("attention"))
def triton_backward(*args):
    from dlcore.kernels import attention

    return attention.backward(*args)


# ---------------------------------------------------------------------------------------------------- cpu (C++)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_args(q, k, bias, klen, scale, window, dropout_p, seed):
    """The arguments after the strides that both C++ entry points share."""
    b, h, lq, d = q.shape
    threshold = min(round(dropout_p * 2 ** 32), 2 ** 32) if dropout_p > 0 else 0
    return ((bias.stride() if bias is not None else (0, 0, 0, 0)), float(scale), int(window[0]), int(window[1]),
            int(seed), int(threshold), 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


def _sizes(q, k):
    return (*q.shape[:2], k.shape[1], q.shape[2], k.shape[2], q.shape[3])


@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=CPU_DTYPES, available=_ext.cpu_unavailable)
def cpu_forward(q, k, v, bias, klen, scale, window, dropout_p, seed):
    o = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    bias = bias.to(q.dtype) if bias is not None else None
    klen = klen.to(torch.int32).contiguous() if klen is not None else None
    sb, *rest = _cpu_args(q, k, bias, klen, scale, window, dropout_p, seed)
    _ext.cpu.attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                               0 if bias is None else bias.data_ptr(), 0 if klen is None else klen.data_ptr(),
                               _ext.DTYPE_CODE[q.dtype], *_sizes(q, k), q.stride()[:3], k.stride()[:3],
                               v.stride()[:3], o.stride()[:3], sb, *rest)
    return o, lse


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=CPU_DTYPES, available=_ext.cpu_unavailable)
def cpu_backward(do, q, k, v, o, lse, bias, bias_grad, klen, scale, window, dropout_p, seed):
    delta = (do.float() * o.float()).sum(-1)  # Δ = rowsum(dO∘O)
    lse = lse.float().contiguous()
    dq, dk, dv = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype), torch.empty(
        k.shape, dtype=v.dtype)
    dbias = torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32) if bias_grad else None
    bias = bias.to(q.dtype) if bias is not None else None
    klen = klen.to(torch.int32).contiguous() if klen is not None else None
    sb, *rest = _cpu_args(q, k, bias, klen, scale, window, dropout_p, seed)
    _ext.cpu.attention_backward(do.data_ptr(), do.stride()[:3], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                0 if dbias is None else dbias.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                0 if klen is None else klen.data_ptr(), _ext.DTYPE_CODE[q.dtype], *_sizes(q, k),
                                q.stride()[:3], k.stride()[:3], v.stride()[:3], sb, *rest)
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------------- cuda (C++)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_BACKWARD_MAX_HEAD_DIM = 128  # dK/dV kernel: 1024·Dp + 59 KB of shared memory (191 KB at 128; H100: 227 KB)


@_dispatch.register(FORWARD, "cuda", devices=("cuda",), dtypes=CUDA_DTYPES, available=_ext.cuda_unavailable)
def cuda_forward(q, k, v, bias, klen, scale, window, dropout_p, seed):
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    bias = bias.to(q.dtype) if bias is not None else None
    klen = klen.to(device=q.device, dtype=torch.int32).contiguous() if klen is not None else None
    sb, *rest = _cpu_args(q, k, bias, klen, scale, window, dropout_p, seed)
    with torch.cuda.device(q.device):
        _ext.cuda.attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr(),
                                    0 if bias is None else bias.data_ptr(), 0 if klen is None else klen.data_ptr(),
                                    _ext.DTYPE_CODE[q.dtype], *_sizes(q, k), q.stride()[:3], k.stride()[:3],
                                    v.stride()[:3], o.stride()[:3], sb, *rest, _ext.cuda_stream(q.device))
    return o, lse


@_dispatch.register(BACKWARD, "cuda", devices=("cuda",), dtypes=CUDA_DTYPES, available=_ext.cuda_unavailable)
def cuda_backward(do, q, k, v, o, lse, bias, bias_grad, klen, scale, window, dropout_p, seed):
    if q.shape[-1] > CUDA_BACKWARD_MAX_HEAD_DIM:  # its dK/dV kernel's tiles outgrow shared memory
        impls = _dispatch.get_op(BACKWARD).impls
        triton = impls.get("triton")
        use = triton if triton is not None and triton.why_not("cuda", q.dtype) is None else impls["reference"]
        return use.fn(do, q, k, v, o, lse, bias, bias_grad, klen, scale, window, dropout_p, seed)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # Δ = rowsum(dO∘O)
    lse = lse.float().contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dbias = torch.zeros((*q.shape[:3], k.shape[2]), dtype=torch.float32, device=q.device) if bias_grad else None
    bias = bias.to(q.dtype) if bias is not None else None
    klen = klen.to(device=q.device, dtype=torch.int32).contiguous() if klen is not None else None
    sb, *rest = _cpu_args(q, k, bias, klen, scale, window, dropout_p, seed)
    with torch.cuda.device(q.device):
        _ext.cuda.attention_backward(do.data_ptr(), do.stride()[:3], q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                     lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                     0 if dbias is None else dbias.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                     0 if klen is None else klen.data_ptr(), _ext.DTYPE_CODE[q.dtype],
                                     *_sizes(q, k), q.stride()[:3], k.stride()[:3], v.stride()[:3], sb, *rest,
                                     _ext.cuda_stream(q.device))
    return dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------------- custom ops
def _launcher(name: str, q: torch.Tensor, v: torch.Tensor):
    """The dispatch choice, except that a value head dim unlike the query's or a head dim over MAX_HEAD_DIM (torch
    allows both), or fp32 on a GPU at a head dim the Triton tables have no tiles for, runs the reference (which forms
    the L×S matrix) unless a backend was asked for by name (then BackendUnavailableError says why)."""
    backend, launch = _dispatch.select(name, q.device, q.dtype)
    why = None
    if backend != "reference" and v.shape[-1] != q.shape[-1]:
        why = f"needs value head dim == query head dim, got {v.shape[-1]} and {q.shape[-1]}"
    elif backend != "reference" and q.shape[-1] > MAX_HEAD_DIM:
        why = f"supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    elif backend == "triton":
        from dlcore.kernels import attention as kernel

        if kernel.gpu_tiles(q) and not kernel.gpu_supports(q.dtype, q.shape[-1]):
            why = (f"has no spill-free GPU tiles for {q.dtype} at head dim {q.shape[-1]} (fp32: up to 64; "
                   f"bf16/fp16: up to 256)")
    if why is not None:
        if _dispatch.requested_backend() is not None:
            raise _dispatch.BackendUnavailableError(f"dlcore op {name!r}: backend {backend!r} {why}")
        launch = _dispatch.get_op(name).impls["reference"].fn
    return launch


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                    klen: Optional[torch.Tensor], scale: float, window_left: int, window_right: int,
                    dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_dense_last(t) for t in (q, k, v))
    return _launcher(FORWARD, q, v)(q, k, v, bias, klen, scale, (window_left, window_right), dropout_p, seed)


attention_op = torch.library.custom_op("dlcore::flash_attention", mutates_args=())(_attention_impl)


@attention_op.register_fake
def _(q, k, v, bias, klen, scale, window_left, window_right, dropout_p, seed):
    o = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return o, q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@torch.library.custom_op("dlcore::flash_attention_backward", mutates_args=())
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, bias: Optional[torch.Tensor], bias_grad: bool,
                          klen: Optional[torch.Tensor], scale: float, window_left: int, window_right: int,
                          dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v = (_dense_last(t) for t in (do, q, k, v))
    dq, dk, dv, dbias = _launcher(BACKWARD, q, v)(do, q, k, v, o, lse, bias, bias_grad, klen, scale,
                                                  (window_left, window_right), dropout_p, seed)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0))  # custom ops return tensors, never None


@attention_backward_op.register_fake
def _(do, q, k, v, o, lse, bias, bias_grad, klen, scale, window_left, window_right, dropout_p, seed):
    dbias = q.new_empty(bias.shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32) \
        if bias_grad else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, klen, scale, window_left, window_right, dropout_p, seed = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)  # returned for inspection (varlen API); gradients flow through o only
    ctx.save_for_backward(q, k, v, o, lse, bias, klen)
    ctx.conf = (scale, window_left, window_right, dropout_p, seed)


def _differentiable_backward(grad_o, q, k, v, bias, klen, scale, window_left, window_right, dropout_p, seed):
    """(dq, dk, dv, dbias) from plain torch ops under autograd, for a backward with create_graph=True (MAML's inner
    step through a transformer, gradient penalties, Hessian-vector products): autograd of the reference forward
    (same masks, the same Philox dropout mask regenerated from the seed) against dO, in fp32 for 16-bit inputs.
    It forms the [B, H, Lq, Lk] score matrix, as torch's math attention does; the first-order path does not."""
    return _eager.differentiable_grads(
        lambda q, k, v, bias: _reference_math(q, k, v, bias, klen, scale, (window_left, window_right), dropout_p,
                                              seed)[0], (q, k, v, bias), grad_o)


def _backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, bias, klen = ctx.saved_tensors
    if _eager.torch_ops_backward(grad_o):  # create_graph=True: gradients that autograd can differentiate again
        dq, dk, dv, dbias = _differentiable_backward(grad_o, q, k, v, bias, klen, *ctx.conf)
        return dq, dk, dv, dbias, None, None, None, None, None, None
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _attention_backward(grad_o, q, k, v, o, lse, bias, bias_grad, klen, *ctx.conf)
    return dq, dk, dv, (dbias.to(bias.dtype) if bias_grad else None), None, None, None, None, None, None


# eager calls skip the custom-op and autograd layers (dlcore/_eager.py); for inference that took the B4 H8 L512
# fp32 forward from 0.55 to 0.37 ms outside its 10.3 ms kernel on the Xeon VM
_attention = _eager.eager_autograd(attention_op, _setup_context, _backward)
_attention_backward = _eager.direct(attention_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def _check_qkv(q, k, v, enable_gqa: bool) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"query, key and value must share a dtype: query is {q.dtype}, {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but query is on {q.device}")
        if t.dim() < 3:
            raise ValueError(f"{name} must be at least 3-D (..., heads, length, dim), got shape {tuple(t.shape)}")
        if t.dim() != q.dim() or any(a not in (b, 1) for a, b in zip(t.shape[:-3], q.shape[:-3])):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match query {tuple(q.shape)} in the batch dims "
                             f"(equal, or 1 to broadcast)")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"key head dim {k.shape[-1]} differs from query head dim {q.shape[-1]}")
    if k.shape[-2] != v.shape[-2] or k.shape[-3] != v.shape[-3]:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} differ in heads or length")
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk and not (hk == 1 or enable_gqa and hk > 0 and hq % hk == 0):  # (one key/value head broadcasts)
        raise ValueError(f"query has {hq} heads and key/value {hk}: " + (
            "query heads must be a multiple of key/value heads for GQA" if enable_gqa else
            "pass enable_gqa=True for grouped-query attention"))


def _as_bias(mask, name: str, q: torch.Tensor) -> Optional[torch.Tensor]:
    """A boolean mask (True = take part) or a float additive mask → an additive bias in q's dtype."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device} but query is on {q.device}")
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if mask.dtype not in (q.dtype, torch.float32):  # torch's rule: bool, float32, or query's dtype
        raise TypeError(f"{name} must be bool, float32 or query's dtype {q.dtype}, got {mask.dtype}")
    return mask.to(q.dtype)  # (a float32 mask for 16-bit queries: the kernels read the bias in query's dtype)


def _broadcast_bias(bias: torch.Tensor, name: str, full: tuple) -> torch.Tensor:
    try:
        return bias.expand(full)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(bias.shape)} does not broadcast to {full}") from None


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
                                 key_padding_mask: Optional[torch.Tensor] = None,
                                 key_lengths: Optional[torch.Tensor] = None,
                                 window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, computed by a flash kernel (no L×S matrix in memory).

    query (..., Hq, L, E), key (..., Hk, S, E), value (..., Hk, S, Ev); returns (..., Hq, L, Ev) in query's dtype.
    attn_mask: bool (True = take part) or additive float of query's dtype, broadcastable to (..., Hq, L, S);
    an additive mask that requires grad gets its gradient. is_causal: query i sees keys j <= i (top-left aligned,
    as torch, also when L != S); with attn_mask both apply, as torch 2.13 does (older torch refused the pair).
    dropout_p: on the attention weights, Philox-seeded from torch's generator (torch.manual_seed reproduces it).
    enable_gqa: Hq a multiple of Hk. Key and value broadcast as torch's: batch dims of size 1, or one head.
    Extensions (keyword only): key_padding_mask (..., S) as torch.nn.MultiheadAttention's (bool True = ignore the
    key, or additive float); key_lengths (...) integers: only the first key_lengths[b] keys of batch element b
    take part — right-padded batches, whose padded key blocks the kernel then skips (the variable-length path);
    window_size (left, right): query i sees keys i-left..i+right (-1 = unbounded).
    A query row that sees no key returns zeros (as torch). fp32, fp16, bf16 (fp32 math inside) and float64.
    Head dims up to 256 run the flash kernels; larger ones (or a value head dim unlike the query's) the reference,
    which forms the L×S matrix, unless a backend was asked for by name (then an error).
    Under autocast, floating inputs (float64 aside) run in autocast's dtype, as torch's SDPA does.
    """
    query, key, value, attn_mask, key_padding_mask = _eager.autocast_inputs(query, key, value, attn_mask,
                                                                            key_padding_mask)
    _check_qkv(query, key, value, enable_gqa)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    left, right = (int(w) for w in window_size)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    *lead, hq, lq, e = query.shape
    hk, lk = key.shape[-3], key.shape[-2]
    batch = math.prod(lead)
    full = (*lead, hq, lq, lk)
    bias = _as_bias(attn_mask, "attn_mask", query)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (*lead, lk):
            raise ValueError(f"key_padding_mask must have shape {(*lead, lk)}, got {tuple(key_padding_mask.shape)}")
        pad = _as_bias(~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask,
                       "key_padding_mask", query)[..., None, None, :]
        bias = pad if bias is None else bias + pad
    if bias is not None:
        bias = _broadcast_bias(bias, "attn_mask", full).reshape(batch, hq, lq, lk)
    klen = None
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.is_floating_point() \
                or tuple(key_lengths.shape) != tuple(lead):
            raise ValueError(f"key_lengths must be an integer tensor of shape {tuple(lead)}")
        if key_lengths.device != query.device:
            raise ValueError(f"key_lengths is on {key_lengths.device} but query is on {query.device}")
        if key_lengths.numel() and _eager.values_known(key_lengths) and (int(key_lengths.min()) < 0
                                                                         or int(key_lengths.max()) > lk):
            raise ValueError(f"key_lengths must lie in [0, {lk}]")
        klen = key_lengths.reshape(batch).to(torch.int32)
    if lq == 0 or lk == 0 or batch == 0 or hq == 0:
        shape = (*lead, hq, lq, value.shape[-1])
        # zeros (a query that sees no key), in the graph as torch's: backward gives every input a zero gradient
        # (a where, not a product by 0, which would turn a NaN or inf input into NaN)
        inputs = query.sum(-1, keepdim=True) + key.sum() + value.sum()
        return torch.where(torch.zeros((), dtype=torch.bool, device=query.device), inputs, 0.0).expand(shape)
    if key.shape[:-3] != tuple(lead):  # batch dims of size 1 broadcast over query's, as torch's
        key, value = (t.expand(*lead, *t.shape[-3:]).contiguous() for t in (key, value))
    scale = 1.0 / math.sqrt(e) if scale is None else float(scale)
    four_d = query.dim() == 4  # already [batch, heads, length, dim]: no reshapes (~5 µs of a decode step's call)
    q, k, v = (query, key, value) if four_d else (t.reshape(batch, *t.shape[-3:]) for t in (query, key, value))
    if dropout_p > 0 and _eager.in_transform():
        # torch's RNG for the mask, which vmap draws per its `randomness` mode ('different': one mask per sample;
        # a Philox seed is one integer, which .item() cannot read from a batched draw)
        keep = torch.rand((q.shape[0], q.shape[1], lq, lk), device=q.device) >= float(dropout_p)
        o = _reference_math(q, k, v, bias, klen, scale, (left, right), float(dropout_p), 0, keep=keep)[0].to(q.dtype)
    else:
        o, _ = _attention(q, k, v, bias, klen, scale, left, right, float(dropout_p), draw_seed(dropout_p))
    return o if four_d else o.reshape(*lead, hq, lq, value.shape[-1])


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                           max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), return_lse: bool = False):
    """Attention over packed variable-length sequences, as FlashAttention's function of that name.

    q (total_q, Hq, E), k/v (total_k, Hk, E) hold the sequences one after another; cu_seqlens_q/k (int, [B+1],
    starting at 0) their cumulative lengths. Sequence b's queries attend only to sequence b's keys. causal and
    window_size align bottom-right within each sequence, as FlashAttention's: with n_q queries and n_k keys, query i
    sees keys j <= i + n_k - n_q (+ window_size[1]) and j >= i + n_k - n_q - window_size[0] (so one new query over
    a cache of n_k keys sees them all; SDPA's is_causal aligns top-left, as torch's). GQA when Hq is a multiple of
    Hk. Returns out (total_q, Hq, E), zeros for a query that sees no key, and, with return_lse, the natural-log
    log-sum-exp (Hq, total_q) (not differentiable; -inf for a query that sees no key).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor (total, heads, dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    _check_qkv(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), enable_gqa=True)
    lens = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype.is_floating_point or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D integer tensor [batch + 1]")
        cu = cu.to(q.device, torch.int64)
        n = cu.diff()
        if int(cu[0]) != 0 or bool((n < 0).any()) or int(cu[-1]) != total:
            raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}")
        lens.append(n)
    if lens[0].numel() != lens[1].numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    len_q, len_k = lens
    batch = len_q.numel()
    lq = int(len_q.max()) if max_seqlen_q is None else int(max_seqlen_q)
    lk = int(len_k.max()) if max_seqlen_k is None else int(max_seqlen_k)
    if lq < int(len_q.max()) or lk < int(len_k.max()):
        raise ValueError("max_seqlen_q/max_seqlen_k is smaller than the longest sequence")

    left, right = (int(w) for w in window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    # The kernels align masks top-left (query row P sees key rows J <= P + right, J >= P - left). Placing query i
    # of a sequence at padded row i + shift_q and key j at row j + shift_k, with shift_q - shift_k = n_k - n_q,
    # turns that into FlashAttention's bottom-right rule; both shifts are >= 0, and keys moved down by shift_k > 0
    # (a sequence with more queries than keys) leave padded rows above them that a key mask hides. Without a causal
    # mask or a window the alignment does not matter and nothing moves.
    shift_q, shift_k = torch.zeros_like(len_q), torch.zeros_like(len_k)
    if causal or left >= 0 or right >= 0:
        shift_q, shift_k = (len_k - len_q).clamp_min(0), (len_q - len_k).clamp_min(0)
    lq, lk = max(lq, int((len_q + shift_q).max())), max(lk, int((len_k + shift_k).max()))

    def positions(lengths, shift, total):  # (sequence, padded row) of every packed row
        seq = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        return seq, torch.arange(total, device=q.device) - starts[seq] + shift[seq]

    def pad(t, where, length):  # packed (total, H, D) → padded [B, H, length, D] (a view with a dense last dim)
        out = t.new_zeros(batch, length, *t.shape[1:])
        return out.index_put(where, t).transpose(1, 2)

    where_q, where_k = positions(len_q, shift_q, q.shape[0]), positions(len_k, shift_k, k.shape[0])
    key_bias = None
    if bool((shift_k > 0).any()):  # -inf on the padded rows above each moved sequence's keys, [B, 1, 1, lk] expanded
        keep = (torch.arange(lk, device=q.device) >= shift_k[:, None])[:, None, None, :]
        key_bias = _broadcast_bias(_as_bias(keep, "key mask", q), "key mask", (batch, q.shape[1], lq, lk))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if q.shape[0] == 0:
        out, lse = q.new_zeros((0, q.shape[1], v.shape[-1])), q.new_zeros((q.shape[1], 0), dtype=torch.float32)
        return (out, lse) if return_lse else out
    o, lse = _attention(pad(q, where_q, lq), pad(k, where_k, lk), pad(v, where_k, lk), key_bias,
                        (len_k + shift_k).to(torch.int32), scale, left, right, float(dropout_p),
                        draw_seed(dropout_p))
    out = o.transpose(1, 2)[where_q]
    return (out, lse.permute(1, 0, 2)[:, where_q[0], where_q[1]]) if return_lse else out
