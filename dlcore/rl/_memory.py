"""Host memory for replay storage and sum-trees, on transparent huge pages where the kernel offers them.

A replay buffer is read at random: sampling 256 of 1M transitions touches ~2,000 cache lines on as many 4 KB pages,
and each is also a TLB miss whose page walk can miss the cache in turn. Anonymous memory advised MADV_HUGEPAGE
before its first touch is faulted in as 2 MB pages (Linux with /sys/kernel/mm/transparent_hugepage/enabled set to
"madvise" or "always"): one TLB entry covers 512 times as much. torch.zeros memsets its pages as 4 KB pages first,
after which only khugepaged could merge them, late or never; so large tensors here come from an anonymous mmap
(zero pages until touched), advised at once. Elsewhere (other systems, small or GPU tensors) this is torch.zeros.
"""
from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 2 * HUGE_PAGE  # below this a tensor spans at most one whole huge page: not worth a mapping
# Rows this large already fill their pages: one TLB miss per row is amortised over the row. Measured on the AMD
# EPYC VM (one process, interleaved): sampling 256 of 1M (16-byte rows and the tree) 97-106 us on huge pages vs
# 127-133 on 4 KB pages; 32 Atari stacks (7 KB frames of 1.4 GB) 276-294 us vs 226-237, slower on huge pages.
SMALL_ROW_BYTES = 4096


def zeros(shape: tuple, dtype: torch.dtype, device: "str | torch.device" = "cpu") -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype, device=device); a large CPU tensor's memory is advised for huge pages."""
    device = torch.device(device)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype, device=device)
    # anonymous and private (the default, MAP_SHARED, is shmem, whose huge pages are a separate setting, mostly
    # off): reads as zeros, pages faulted in on first touch
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out or refused: ordinary pages, same contents
        pass
    # frombuffer keeps `region` alive as long as the tensor (or a view of it) is
    return torch.frombuffer(region, dtype=dtype, count=numel).view(shape)


def full(shape: tuple, value: float, dtype: torch.dtype, device: "str | torch.device" = "cpu") -> torch.Tensor:
    """torch.full, with zeros()'s memory."""
    out = zeros(shape, dtype, device)
    return out.fill_(value) if value != 0 else out


def rows(shape: tuple, dtype: torch.dtype, device: "str | torch.device" = "cpu") -> torch.Tensor:
    """Zeroed storage of shape[0] rows read at random: on huge pages (zeros) when a row is smaller than a page,
    torch.zeros otherwise (see SMALL_ROW_BYTES)."""
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if row_bytes < SMALL_ROW_BYTES:
        return zeros(shape, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device)
