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
    """Largest |actual − expected|, in float64 (complex128 when either is complex: both parts count)."""
    wide = torch.complex128 if actual.is_complex() or expected.is_complex() else torch.float64
    return (actual.to(wide) - expected.to(wide)).abs().max().item()


def twins(make, dtype: torch.dtype = torch.float64) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dlcore model, its stock-PyTorch twin) from make(stock: bool), both in `dtype`, the twin holding the dlcore
    model's state_dict (every model in dlcore.models takes stock=True for its twin)."""
    ours, twin = make(False).to(dtype), make(True).to(dtype)
    twin.load_state_dict(ours.state_dict())
    return ours, twin
