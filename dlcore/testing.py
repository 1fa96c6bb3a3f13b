"""Helpers for dlcore's tests and for users checking an op on their machine."""
from __future__ import annotations

import torch

from dlcore import _dispatch


def devices() -> list[str]:
    """The device types present: cpu, and cuda when a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_pairs(op: str, dtype: torch.dtype | None = None) -> list[tuple[str, str]]:
    """Every (backend, device) pair that can run `op` here, e.g. [("reference", "cpu"), ("cpu", "cpu"), ...]."""
    pairs = []
    for device in devices():
        for name, impl in sorted(_dispatch.get_op(op).impls.items()):
            if impl.why_not(device, dtype) is None:
                pairs.append((name, device))
    return pairs


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()
