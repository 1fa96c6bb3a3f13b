"""Drop-in layers: same constructor arguments and state_dict keys as the torch.nn modules they replace."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlcore.blocks import (BasicBlock, BatchNorm1d, BatchNorm1dReLU, BatchNorm2d, BatchNorm2dLeakyReLU,  # noqa: F401
                           BatchNorm2dReLU, Bottleneck, FoldedConv2d)  # (re-exported)
from dlcore.ops.additive_attention import BahdanauAttention  # noqa: F401  (re-exported)
from dlcore.ops.attention import scaled_dot_product_attention
from dlcore.ops.bias_gelu import dropout, linear, linear_act, linear_gelu
from dlcore.ops.conv_pool import conv2d_relu_maxpool2d, fusable_pool
from dlcore.ops.conv_relu import conv2d_relu
from dlcore.ops.cross_entropy import cross_entropy
from dlcore.ops.layer_norm import layer_norm


class Conv2dReLU(nn.Conv2d):
    """nn.Conv2d followed by ReLU, as one op (dlcore.functional.conv2d_relu): same arguments, parameters and
    state_dict keys as nn.Conv2d. Input [N, C_in, H, W] → [N, C_out, H', W']. A padding_mode other than 'zeros'
    pads the input first (F.pad, as nn.Conv2d does), then the fused op runs without padding."""

    def _conv_input(self, x: torch.Tensor) -> tuple:
        """(input, padding) for the fused op: nn.Conv2d's own padding step for the non-zero padding modes."""
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, relu: nn.Module | None = None) -> "Conv2dReLU":
        """The fused layer holding `conv`'s parameters (shared, not copied) in place of (conv, relu)."""
        if relu is not None and not isinstance(relu, nn.ReLU):
            raise TypeError(f"expected nn.ReLU after the convolution, got {type(relu).__name__}")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        fused.weight, fused.bias = conv.weight, conv.bias
        return fused.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._conv_input(x)
        return conv2d_relu(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class Conv2dReLUMaxPool2d(Conv2dReLU):
    """nn.Conv2d → ReLU → nn.MaxPool2d as one op (dlcore.functional.conv2d_relu_maxpool2d): nn.Conv2d's arguments,
    parameters and state_dict keys, plus the pool's (pool_kernel_size, pool_stride=None → the kernel size,
    pool_padding, ceil_mode)."""

    def __init__(self, *args, pool_kernel_size=3, pool_stride=None, pool_padding=0, ceil_mode: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.pool_kernel_size, self.pool_stride = pool_kernel_size, pool_stride
        self.pool_padding, self.ceil_mode = pool_padding, ceil_mode

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, relu: nn.Module | None = None,
                     pool: nn.Module | None = None) -> "Conv2dReLUMaxPool2d":
        """The fused layer holding `conv`'s parameters (shared, not copied) in place of (conv, relu, pool)."""
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"expected nn.MaxPool2d after the ReLU, got {type(pool).__name__}")
        if not fusable_pool(pool):
            raise ValueError("Conv2dReLUMaxPool2d fuses max pools with dilation 1 and no returned indices")
        fused = super().from_modules(conv, relu)
        fused.pool_kernel_size, fused.pool_stride = pool.kernel_size, pool.stride
        fused.pool_padding, fused.ceil_mode = pool.padding, pool.ceil_mode
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._conv_input(x)
        return conv2d_relu_maxpool2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                                     self.pool_kernel_size, self.pool_stride, self.pool_padding, self.ceil_mode)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}"
                f", pool_padding={self.pool_padding}, ceil_mode={self.ceil_mode}")


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with the attention itself computed by dlcore's flash kernel
    (dlcore.functional.scaled_dot_product_attention): same constructor, parameters, state_dict keys and call.

    The fast path runs when need_weights=False (the per-head weights are what a flash kernel never forms, as with
    torch's own fast path); with need_weights=True, add_bias_kv or add_zero_attn the call is torch's own forward.
    key_padding_mask (N, S) and attn_mask ((L, S) or (N·heads, L, S)) may be bool (True = masked out, torch's
    convention for this module) or additive float; is_causal=True is the hint that attn_mask is the causal mask,
    which is then applied as a causal window. Cross-attention (L ≠ S, kdim/vdim) and batch_first work as in torch.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or self.bias_k is not None or self.add_zero_attn:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, embed = query.shape  # (L, N, E) from here on
        src = key.shape[0]
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        heads, head_dim = self.num_heads, self.head_dim

        def split(x, w, b, n):  # (n, N, ·) → (N, heads, n, head_dim)
            return F.linear(x, w, b).view(n, batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = split(query, w_q, b_q, length), split(key, w_k, b_k, src), split(value, w_v, b_v, src)
        mask = None
        if attn_mask is not None and not is_causal:
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
            mask = mask.view(batch, heads, length, src) if mask.dim() == 3 else mask
        padding = None
        if key_padding_mask is not None:
            padding = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.to(q.dtype)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal, key_padding_mask=padding)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm on dlcore's fused kernel: same arguments, parameters and state_dict keys.
    forward(x) → y; forward(x, residual=r) → (LayerNorm(x + r), x + r) in one pass (pre-LN transformers)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)


class Linear(nn.Linear):
    """nn.Linear through dlcore.functional.linear (dlcore's skinny GEMM for few rows of fp32 on the CPU, torch's
    otherwise): same arguments, parameters and state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LinearGELU(nn.Linear):
    """nn.Linear followed by GELU (approximate 'none' or 'tanh'): the matmul, then dlcore's fused bias + GELU.
    Same parameters and state_dict keys as nn.Linear. Input [..., in_features] → [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, approximate: str = "none",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    @classmethod
    def from_modules(cls, linear: nn.Linear, gelu: nn.GELU) -> "LinearGELU":
        """The fused layer holding `linear`'s parameters (shared, not copied) in place of (linear, gelu)."""
        return _share_linear(cls(linear.in_features, linear.out_features, linear.bias is not None, gelu.approximate,
                                 device="meta"), linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x, self.weight, self.bias, self.approximate)


def _share_linear(fused: nn.Linear, linear: nn.Linear) -> nn.Linear:
    """`fused` (built on the meta device) holding `linear`'s parameters, in `linear`'s train/eval mode."""
    fused.weight, fused.bias = linear.weight, linear.bias
    return fused.train(linear.training)


class Dropout(nn.Dropout):
    """nn.Dropout with a counter-based (Philox) mask, regenerated in backward instead of stored; exactly the
    identity in eval mode and at p = 0; reproducible under torch.manual_seed; inplace as in torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)


class LinearReLUDropout(nn.Linear):
    """nn.Linear → ReLU → Dropout(p): the matmul, then one fused pass for bias + ReLU + Philox dropout (its
    backward regenerates the mask). Same parameters and state_dict keys as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    @classmethod
    def from_modules(cls, linear: nn.Linear, relu: nn.ReLU, dropout: nn.Dropout | None = None) -> "LinearReLUDropout":
        """The fused layer holding `linear`'s parameters (shared, not copied) in place of (linear, relu[, dropout])
        (p = 0 without a dropout; in the dropout's train/eval mode when there is one)."""
        fused = _share_linear(cls(linear.in_features, linear.out_features, linear.bias is not None,
                                  p=0.0 if dropout is None else dropout.p, device="meta"), linear)
        return fused.train(linear.training if dropout is None else dropout.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_act(x, self.weight, self.bias, "relu", self.p, self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss on dlcore's chunked kernel: the same arguments (class weights, ignore_index, reduction,
    label_smoothing), class-index or class-probability targets, logits [C], [N, C] or [N, C, d1, ...]."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                             label_smoothing=self.label_smoothing)
