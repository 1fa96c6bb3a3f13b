"""Benchmark cases for flash attention (issue 4). CPU: fp32, B4 H8 d64, L 512 and 2048, causal and not, forward and
forward+backward, against torch's SDPA on the CPU (itself a flash implementation). GPU: bf16, head dims 64 and 128,
L 1k–16k (batch·L = 16k tokens), causal and not, against torch's SDPA default backend and torch.compile of it.
FLOPs: 4·B·H·Lq·Lk·d forward (two matmuls), halved when causal; forward+backward 3.5× that (FlashAttention's
convention: backward = 2.5× forward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcore.bench.harness import DLCORE, Case

CPU_SHAPES = [(4, 8, 512, 64), (4, 8, 2048, 64)]
GPU_SHAPES = [(16384 // length, 16 if d == 128 else 32, length, d) for d in (64, 128)
              for length in (1024, 4096, 16384)]


def _setup(shape, causal: bool, backward: bool, device: str, dtype: torch.dtype):
    b, h, length, d = shape

    def setup(n_sets: int):
        from dlcore.functional import scaled_dot_product_attention

        sets = [[torch.randn(b, h, length, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3)]
                for _ in range(n_sets)]
        state = {"i": 0}

        def variant(fn):
            def call():
                q, k, v = sets[state["i"] % n_sets]
                state["i"] += 1
                out = fn(q, k, v, is_causal=causal)
                if backward:
                    out.backward(torch.ones_like(out))
                return out
            return call

        variants = {DLCORE: variant(scaled_dot_product_attention),
                    "torch SDPA": variant(F.scaled_dot_product_attention)}
        if device != "cpu":
            variants["torch.compile"] = variant(torch.compile(F.scaled_dot_product_attention))
        return variants

    return setup


def cases(device: str) -> list[Case]:
    on_gpu = device != "cpu"
    shapes, dtype = (GPU_SHAPES, torch.bfloat16) if on_gpu else (CPU_SHAPES, torch.float32)
    out = []
    for shape in shapes:
        b, h, length, d = shape
        for causal in (False, True):
            flops = 4 * b * h * length * length * d * (0.5 if causal else 1.0)
            for backward in (False, True):
                name = (f"{'causal' if causal else 'full'} B{b} H{h} L{length} d{d} {str(dtype)[6:]} "
                        f"{'fwd+bwd' if backward else 'fwd'}")
                out.append(Case("attention", name, device, _setup(shape, causal, backward, device, dtype),
                                flops=flops * (3.5 if backward else 1.0), baseline="torch SDPA", target=1.0,
                                ops=("attention", "attention_backward") if backward else ("attention",),
                                quick=length <= 1024 or (not on_gpu and length <= 512)))
    return out
