"""Argument checks shared by the ops' public functions: each failure is a Python exception naming the argument."""
from __future__ import annotations

from typing import Optional

import torch

from dlcore import _eager


def tensor(name: str, t, *, floating: bool = True, like: Optional[torch.Tensor] = None, like_name: str = "input",
           same_dtype: bool = True) -> torch.Tensor:
    """`t` must be a tensor (floating point when `floating`), on `like`'s device (and of its dtype when
    `same_dtype`). Returns t."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None and t is not like:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{name} is {t.dtype} but {like_name} is {like.dtype}")
    return t


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def dense_vector(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a dense 1-D tensor of `dtype`, for kernels that read a weight or bias as one: t itself when it already
    is one (.to and .contiguous cost ~1 µs each even with nothing to do), else a copy (a strided or expanded vector:
    w[::2], w.expand(C); a [C1, C2] LayerNorm weight flattened)."""
    if t.dtype is dtype and t.dim() == 1 and t.is_contiguous():
        return t
    return t.reshape(-1).to(dtype).contiguous()


def class_targets(name: str, target, n_classes: int, ignore_index: int, like: torch.Tensor) -> torch.Tensor:
    """Integer class indices on `like`'s device, each in [0, n_classes) or equal to ignore_index; returned as a
    dense int64 tensor (the kernels read it as one: a strided or expanded target is copied)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must hold integer class indices, got {target.dtype}")
    if target.device != like.device:
        raise ValueError(f"{name} is on {target.device} but input is on {like.device}")
    if target.numel() and _eager.values_known(target):
        bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise IndexError(f"{name} holds {value}, out of range for {n_classes} classes "
                             f"(and not ignore_index={ignore_index})")
    return target.long().contiguous()
