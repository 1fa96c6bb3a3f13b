"""Fused additive (Bahdanau) attention, forward and backward (issue 5): Seq2Seq's attention in one kernel.

For a decoder state s_t and encoder outputs h_1..h_S (right-padded; positions j < length count):
    e_j = vᵀ tanh(W s_t + U h_j),   α = softmax(e),   c_t = Σ_j α_j h_j
The two matmuls stay matmuls (U h is computed once per source sentence, W s once per step); this op fuses the
add, tanh, the v-projection, the masked softmax and the weighted sum, so the [B, S, A] tanh tensor is never stored.

Launcher signature shared by every backend (ws [B, A] = W s_t; uh [B, S, A] = U h; v [A]; h [B, S, D]; lengths
int64 [B] in [1, S]; all contiguous):
  forward(ws, uh, v, h, lengths) -> (context [B, D] in h's dtype, alpha fp32 [B, S], 0 past each length)
  backward(grad_context, ws, uh, v, h, lengths, alpha) -> (grad_ws, grad_uh, grad_v, grad_h)
Backward (t_j = tanh(ws + uh_j) recomputed): dα_j = dc·h_j;  de_j = α_j (dα_j − Σ_k α_k dα_k);  dh_j = α_j dc;
  duh_j = de_j·v∘(1 − t_j²);  dws = Σ_j duh_j;  dv = Σ_{b,j} de_j t_j.  α is returned for inspection only (not
  differentiable).

Backends
  reference  plain PyTorch (float64 for float64 inputs, else fp32 math).
  cpu        csrc/cpu/additive_attention.cpp: OpenMP over the batch, vectorised polynomial tanh, fp32.
  triton     kernels/additive_attention.py: one program per batch row, online softmax; widths ≤ 1024.
  cuda       not written (a helper op: Triton's kernel is the GPU path): reported unavailable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dlcore import _checks, _dispatch, _eager, _ext

FORWARD, BACKWARD = "additive_attention", "additive_attention_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton",))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _math(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _visible(lengths, S, device):
    return torch.arange(S, device=device) < lengths[:, None]


# ---------------------------------------------------------------------------------------------------- reference
@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(ws, uh, v, h, lengths):
    t = torch.tanh(_math(ws)[:, None, :] + _math(uh))
    e = (t @ _math(v)).masked_fill(~_visible(lengths, uh.shape[1], uh.device), float("-inf"))
    alpha = torch.softmax(e, 1)
    ctx = torch.einsum("bs,bsd->bd", alpha, _math(h))
    return ctx.to(h.dtype), alpha.to(torch.float64 if h.dtype == torch.float64 else torch.float32)


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(dc, ws, uh, v, h, lengths, alpha):
    dc, hm, alpha = _math(dc), _math(h), _math(alpha)
    t = torch.tanh(_math(ws)[:, None, :] + _math(uh))
    dalpha = torch.einsum("bd,bsd->bs", dc, hm)
    de = alpha * (dalpha - (alpha * dalpha).sum(1, keepdim=True))
    dh = alpha[:, :, None] * dc[:, None, :]
    duh = de[:, :, None] * _math(v) * (1 - t * t)
    return duh.sum(1).to(ws.dtype), duh.to(uh.dtype), torch.einsum("bs,bsa->a", de, t).to(v.dtype), dh.to(h.dtype)


# ---------------------------------------------------------------------------------------------------- cpu (C++)
@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=(torch.float32,), available=_ext.cpu_unavailable)
def cpu_forward(ws, uh, v, h, lengths):
    B, S, A = uh.shape
    ctx = torch.empty((B, h.shape[2]), dtype=h.dtype)
    alpha = torch.empty((B, S), dtype=torch.float32)
    _ext.cpu.additive_attention_forward(ws.data_ptr(), uh.data_ptr(), v.data_ptr(), h.data_ptr(), lengths.data_ptr(),
                                        ctx.data_ptr(), alpha.data_ptr(), B, S, A, h.shape[2])
    return ctx, alpha


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=(torch.float32,), available=_ext.cpu_unavailable)
def cpu_backward(dc, ws, uh, v, h, lengths, alpha):
    B, S, A = uh.shape
    dws, duh, dh = torch.empty_like(ws), torch.empty_like(uh), torch.empty_like(h)
    dv = torch.empty(A, dtype=torch.float32)
    _ext.cpu.additive_attention_backward(dc.data_ptr(), ws.data_ptr(), uh.data_ptr(), v.data_ptr(), h.data_ptr(),
                                         lengths.data_ptr(), alpha.data_ptr(), dws.data_ptr(), duh.data_ptr(),
                                         dv.data_ptr(), dh.data_ptr(), B, S, A, h.shape[2])
    return dws, duh, dv, dh


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                    available=_ext.triton_unavailable("additive_attention"))
def triton_forward(ws, uh, v, h, lengths):
    from dlcore.kernels import additive_attention

    return additive_attention.forward(ws, uh, v, h, lengths)


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                    available=_ext.triton_unavailable("additive_attention"))
def triton_backward(dc, ws, uh, v, h, lengths, alpha):
    from dlcore.kernels import additive_attention

    dws, duh, dv, dh = additive_attention.backward(dc, ws, uh, v, h, lengths, alpha)
    return dws, duh, dv.to(v.dtype), dh


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dlcore::additive_attention", mutates_args=())
def additive_attention_op(ws: torch.Tensor, uh: torch.Tensor, v: torch.Tensor, h: torch.Tensor,
                          lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, launch = _dispatch.select(FORWARD, h.device, h.dtype)
    return launch(ws, uh, v, h, lengths)


@additive_attention_op.register_fake
def _(ws, uh, v, h, lengths):
    stats = torch.float64 if h.dtype == torch.float64 else torch.float32
    return h.new_empty((h.shape[0], h.shape[2])), h.new_empty(uh.shape[:2], dtype=stats)


@torch.library.custom_op("dlcore::additive_attention_backward", mutates_args=())
def additive_attention_backward_op(dc: torch.Tensor, ws: torch.Tensor, uh: torch.Tensor, v: torch.Tensor,
                                   h: torch.Tensor, lengths: torch.Tensor, alpha: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _, launch = _dispatch.select(BACKWARD, h.device, h.dtype)
    dws, duh, dv, dh = launch(dc.contiguous(), ws, uh, v, h, lengths, alpha)
    return dws, duh, dv.to(v.dtype), dh


@additive_attention_backward_op.register_fake
def _(dc, ws, uh, v, h, lengths, alpha):
    return torch.empty_like(ws), torch.empty_like(uh), torch.empty_like(v), torch.empty_like(h)


def _setup_context(ctx, inputs, output):
    ws, uh, v, h, lengths = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(ws, uh, v, h, lengths, output[1])


def _backward(ctx, grad_context, _grad_alpha):
    ws, uh, v, h, lengths, alpha = ctx.saved_tensors
    if _eager.torch_ops_backward(grad_context):  # create_graph=True: autograd of the reference (tanh scores, masked softmax, sum)
        return (*_eager.differentiable_grads(lambda *a: reference_forward(*a, lengths)[0], (ws, uh, v, h),
                                             grad_context), None)
    return (*_additive_attention_backward(grad_context, ws, uh, v, h, lengths, alpha), None)


_additive_attention = _eager.eager_autograd(additive_attention_op, _setup_context, _backward)
_additive_attention_backward = _eager.direct(additive_attention_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def additive_attention(query_proj: torch.Tensor, keys_proj: torch.Tensor, v: torch.Tensor, values: torch.Tensor,
                       lengths: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bahdanau attention given the projections: query_proj [B, A] (= W s), keys_proj [B, S, A] (= U h),
    v [A], values [B, S, D] (h); lengths int [B] in [1, S] (right padding; None = all S).
    Returns (context [B, D], alpha [B, S]: the attention weights, 0 on padding, not differentiable)."""
    _checks.tensor("values", values)
    for name, t in (("query_proj", query_proj), ("keys_proj", keys_proj), ("v", v)):
        _checks.tensor(name, t, like=values, like_name="values")
    if values.dim() != 3 or keys_proj.dim() != 3 or keys_proj.shape[:2] != values.shape[:2]:
        raise ValueError(f"keys_proj [B, S, A] and values [B, S, D] must share B and S, got {tuple(keys_proj.shape)} "
                         f"and {tuple(values.shape)}")
    B, S, A = keys_proj.shape
    _checks.shape("query_proj", query_proj, (B, A))
    _checks.shape("v", v, (A,))
    if S == 0:
        raise ValueError("values has no positions (S = 0)")
    if lengths is None:
        lengths = torch.full((B,), S, dtype=torch.int64, device=values.device)
    elif not isinstance(lengths, torch.Tensor) or lengths.is_floating_point() or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be an integer tensor of shape ({B},)")
    elif lengths.device != values.device:
        raise ValueError(f"lengths is on {lengths.device} but values is on {values.device}")
    if B and _eager.values_known(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > S):
        raise ValueError(f"lengths must lie in [1, {S}]")
    return _additive_attention(query_proj.contiguous(), keys_proj.contiguous(), v.contiguous(),
                               values.contiguous(), lengths.to(torch.int64).contiguous())


class BahdanauAttention(nn.Module):
    """Additive attention (Bahdanau et al. 2015): W (query_dim → attn_dim, no bias), U (key_dim → attn_dim, with
    bias), v (attn_dim). forward(query [B, query_dim], keys [B, S, key_dim], lengths [B], keys_proj=None) →
    (context [B, key_dim], alpha [B, S]); pass keys_proj = module.project_keys(keys) to reuse U·h across steps."""

    def __init__(self, query_dim: int, key_dim: int, attn_dim: int, stock: bool = False):
        super().__init__()
        self.stock = stock
        self.W = nn.Linear(query_dim, attn_dim, bias=False)
        self.U = nn.Linear(key_dim, attn_dim)
        self.v = nn.Parameter(torch.empty(attn_dim).uniform_(-1 / math.sqrt(attn_dim), 1 / math.sqrt(attn_dim)))

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        return self.U(keys)

    def forward(self, query, keys, lengths=None, keys_proj=None):
        keys_proj = self.project_keys(keys) if keys_proj is None else keys_proj
        if self.stock:
            e = torch.tanh(self.W(query)[:, None, :] + keys_proj) @ self.v
            if lengths is not None:
                e = e.masked_fill(~_visible(lengths, keys.shape[1], keys.device), float("-inf"))
            alpha = torch.softmax(e, 1)
            return torch.einsum("bs,bsd->bd", alpha, keys), alpha.detach()
        return additive_attention(self.W(query), keys_proj, self.v, keys, lengths)
