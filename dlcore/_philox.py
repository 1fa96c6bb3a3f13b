"""Philox4x32-10 (Salmon et al. 2011) in plain PyTorch: the reference for the counter-based random words the
kernels compute in csrc/common/philox.h and kernels/attention.py. Values are 32-bit words held in int64 tensors.

Two streams use it: dropout masks (dlcore.ops.attention.philox_keep: counter (j, i, b·H + h, 0)) and the
prioritized replay buffers' sampling offsets (`uniform53`: counter (i, draw_lo, draw_hi, 1)), so a draw is the same
numbers on every backend and device, and a buffer's state is (seed, draws so far).
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def draw_seed(dropout_p: float) -> int:
    """A dropout mask's Philox seed, drawn from torch's default CPU generator (so torch.manual_seed reproduces it);
    0 when nothing is dropped."""
    return int(torch.randint(0, 2 ** 62, (1,)).item()) if dropout_p > 0 else 0


def _mul32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a·m for 32-bit values held in int64 (the product does not fit in int64)."""
    lo_part, hi_part = (a & 0xFFFF) * m, (a >> 16) * m  # each < 2⁴⁸
    return (hi_part + (lo_part >> 16)) >> 16, (a * m) & _MASK32  # low word: int64 wrap-around is mod 2⁶⁴


def philox4x32_10(c0, c1, c2, c3, seed: int) -> tuple[torch.Tensor, ...]:
    """The four output words for counters (c0, c1, c2, c3) (int64 tensors of 32-bit values, broadcastable) under
    key (seed_lo, seed_hi)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def uniform53(seed: int, counter: int, n: int, device="cpu") -> torch.Tensor:
    """n float64 in [0, 1): element i is the top 53 of the 64 bits (w0, w1) of counter (i, counter_lo, counter_hi,
    1), times 2⁻⁵³ (exact: csrc/common/philox.h uniform53 gives the same doubles)."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    fill = torch.zeros_like(i)
    w0, w1, _, _ = philox4x32_10(i, fill + (counter & _MASK32), fill + ((counter >> 32) & _MASK32), fill + 1, seed)
    return ((w0 << 21) | (w1 >> 11)).double() * 2.0 ** -53
