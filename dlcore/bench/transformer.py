"""Benchmark cases for the transformer helper ops of issue 5, forward+backward at GPT-2 shapes (4·512 tokens,
width 768, vocabulary 8192 on the CPU; 8·1024 tokens and GPT-2's 50257 on a GPU):
- layer_norm with the residual add fused, against F.layer_norm(x + r) (eager and torch.compile);
- bias_gelu (tanh), against F.gelu(x + b, approximate="tanh");
- cross_entropy over [tokens, vocab] logits, against F.cross_entropy;
- linear_cross_entropy (the output layer + loss), against F.cross_entropy(F.linear(x, W), t);
- additive (Bahdanau) attention for one decoder step (batch 64, 48 source positions, width 256, right-padded),
  against the stock chain tanh → ·v → masked softmax → weighted sum.
Bytes are the minimum traffic of the fused forward+backward (each tensor read or written once per pass)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcore.bench.harness import DLCORE, Case


def _shape(device: str) -> tuple[int, int, int, torch.dtype]:
    return (2048, 768, 8192, torch.float32) if device == "cpu" else (8192, 768, 50257, torch.bfloat16)


def _case(op, name, device, make_inputs, ours, stock, nbytes, flops=0.0, ops=()):
    """A forward+backward case: make_inputs() → tuple of tensors; ours/stock(*inputs) → a tensor to backprop."""
    def setup(n_sets: int):
        sets = [make_inputs() for _ in range(n_sets)]
        state = {"i": 0}

        def variant(fn):
            def call():
                inputs = sets[state["i"] % n_sets]
                state["i"] += 1
                out = fn(*inputs)
                out.backward(torch.ones_like(out))
                return out
            return call

        variants = {DLCORE: variant(ours), "torch eager": variant(stock)}
        if device != "cpu":
            variants["torch.compile"] = variant(torch.compile(stock))
        return variants

    return Case(op, name, device, setup, bytes=nbytes, flops=flops, baseline="torch eager", target=1.0,
                ops=ops)


def cases(device: str) -> list[Case]:
    from dlcore.functional import additive_attention, bias_gelu, cross_entropy, layer_norm, linear_cross_entropy

    rows, width, vocab, dtype = _shape(device)
    size = torch.tensor([], dtype=dtype).element_size()
    kw = dict(device=device, dtype=dtype)

    def grad_leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device, dtype=dt) * scale).requires_grad_()

    def ln_inputs():
        return grad_leaf(rows, width), grad_leaf(rows, width), grad_leaf(width, dt=torch.float32), \
            grad_leaf(width, dt=torch.float32)

    def ln_ours(x, r, w, b):
        y, h = layer_norm(x, width, w, b, residual=r)
        return y + h  # both outputs carry a gradient, as in a pre-LN block

    def ln_stock(x, r, w, b):
        h = x + r
        return F.layer_norm(h, (width,), w.to(h.dtype), b.to(h.dtype)) + h

    hidden = 4 * width

    def gelu_inputs():
        return grad_leaf(rows, hidden), grad_leaf(hidden, dt=torch.float32)

    def ce_inputs():
        return grad_leaf(rows, vocab, scale=3.0), torch.randint(0, vocab, (rows,), device=device)

    def lce_inputs():
        return grad_leaf(rows, width), grad_leaf(vocab, width, scale=0.02), \
            torch.randint(0, vocab, (rows,), device=device)

    B, S, A, D = 64, 48, 256, 256
    lengths = torch.randint(S // 2, S + 1, (B,), device=device)

    def aa_inputs():
        return grad_leaf(B, A), grad_leaf(B, S, A), grad_leaf(A), grad_leaf(B, S, D)

    def aa_stock(ws, uh, v, h):
        e = torch.tanh(ws[:, None] + uh) @ v
        e = e.masked_fill(torch.arange(S, device=device) >= lengths[:, None], float("-inf"))
        return torch.einsum("bs,bsd->bd", e.softmax(1), h)

    ln_bytes = rows * width * size * 7  # fwd: x, r → y, h; bwd: dy, dh, h → dx
    gelu_bytes = rows * hidden * size * 5  # fwd: x → y; bwd: dy, x → dx
    ce_bytes = rows * vocab * size * 3  # fwd: z; bwd: z → dz
    shape = f"{rows}×{width} {str(dtype)[6:]}"
    return [
        _case("transformer", f"layer_norm+residual {shape} fwd+bwd", device, ln_inputs, ln_ours, ln_stock, ln_bytes,
              ops=("layer_norm", "layer_norm_backward")),
        _case("transformer", f"bias_gelu(tanh) {rows}×{hidden} {str(dtype)[6:]} fwd+bwd", device, gelu_inputs,
              lambda x, b: bias_gelu(x, b, "tanh"), lambda x, b: F.gelu(x + b.to(x.dtype), approximate="tanh"),
              gelu_bytes, ops=("bias_gelu", "bias_gelu_backward")),
        _case("transformer", f"cross_entropy {rows}×{vocab} {str(dtype)[6:]} fwd+bwd", device, ce_inputs,
              cross_entropy, F.cross_entropy, ce_bytes, ops=("cross_entropy", "cross_entropy_backward")),
        _case("transformer", f"linear_cross_entropy {shape}→{vocab} fwd+bwd", device, lce_inputs,
              lambda x, w, t: linear_cross_entropy(x, w, t), lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
              nbytes=(vocab * width * 3 + rows * width * 2) * size, flops=6.0 * rows * width * vocab,
              ops=("cross_entropy",)),
        _case("transformer", f"additive_attention B{B} S{S} A{A} D{D} {str(dtype)[6:]} fwd+bwd", device, aa_inputs,
              lambda ws, uh, v, h: additive_attention(ws, uh, v, h, lengths)[0], aa_stock,
              nbytes=B * S * (2 * A + 2 * D) * size, ops=("additive_attention", "additive_attention_backward")),
    ]
