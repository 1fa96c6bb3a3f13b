"""Multi-tensor launch plans, shared by every multi-tensor op (apex's multi_tensor_apply, as tables).

A plan holds, on the tensors' device:
  ptrs   int64 [n_tensors, n_slots]  one address per slot (0 for an absent optional tensor)
  numels int64 [n_tensors]
  chunks int64 [n_chunks, 2]         (tensor index, first element) of every chunk of `chunk_size` elements
so one launch covers every tensor of a group whatever their sizes. Plans are cached by the addresses and sizes
they hold, so a new plan is built only when one changes (e.g. gradients re-allocated by zero_grad()).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Plan:
    ptrs: torch.Tensor
    numels: torch.Tensor
    chunks: torch.Tensor
    n_chunks: int
    chunk_size: int
    key: tuple


def address(t: Optional[torch.Tensor]) -> int:
    """A tensor's data address as the extensions take it; 0 for an absent (None) tensor."""
    return 0 if t is None else t.data_ptr()


def build_plan(slots: Sequence[Sequence[Optional[torch.Tensor]]], chunk_size: int, device: torch.device,
               key: Optional[tuple] = None) -> Plan:
    """`slots[s][i]` is tensor i's tensor for slot s (None where the slot is unused)."""
    n = len(slots[0])
    numels = [t.numel() for t in slots[0]]
    if key is None:
        key = plan_key(slots, chunk_size)
    ptr_rows = [[address(slot[i]) for slot in slots] for i in range(n)]
    chunk_rows = [(i, start) for i, numel in enumerate(numels) for start in range(0, numel, chunk_size)]
    host = dict(
        ptrs=torch.tensor(ptr_rows, dtype=torch.int64).reshape(n, len(slots)),
        numels=torch.tensor(numels, dtype=torch.int64),
        chunks=torch.tensor(chunk_rows, dtype=torch.int64).reshape(len(chunk_rows), 2),
    )
    on_device = {k: v.to(device, non_blocking=True) for k, v in host.items()}
    return Plan(**on_device, n_chunks=len(chunk_rows), chunk_size=chunk_size, key=key)


_DATA_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel


def plan_key(slots, chunk_size: int) -> tuple:
    """Which slots are used, every address, and the sizes. Addresses alone are not enough: a freed tensor's
    address can come back holding a tensor of another size. Built with map() over the method descriptors: a step
    of 62 parameters asks for ~430 addresses, and a Python-level loop tripled the cost when the caches are cold
    (as they are after a large step)."""
    used = tuple(slot[0] is not None for slot in slots)  # a slot is used by every tensor or by none
    present = (slot for slot, u in zip(slots, used) if u)
    return (chunk_size, used, *map(_DATA_PTR, itertools.chain.from_iterable(present)), *map(_NUMEL, slots[0]))


_CACHE: "OrderedDict[tuple, Plan]" = OrderedDict()
CACHE_SIZE = 64  # plans kept (least recently used dropped): one per (optimizer group, device, dtype) in practice


def cached_plan(slots, chunk_size: int, device: torch.device) -> Plan:
    """The plan for these tensors, built on first use and rebuilt when any address or size changes."""
    key = plan_key(slots, chunk_size) + (str(device),)
    plan = _CACHE.get(key)
    if plan is None:
        plan = build_plan(slots, chunk_size, device, key)
        _CACHE[key] = plan
        if len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return plan
