"""Triton row gather (the `triton` backend of dlcore/rl/gather.py's gather_rows op).

v1 (shipped): dst_f[b, :] = src_f[index[b], :] for every field f of a replay batch in one launch. The fields' base
addresses and row sizes (bytes) come from an int64 table [fields, 3] = (src, dst, row_bytes), cast to byte
pointers in the kernel (as the multi-tensor Adam does); program (b, f) copies row b of field f in BLOCK-byte
pieces. Indices are validated by the launcher before the launch.
"""
from __future__ import annotations

import torch
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, dual_kernel, gpu_tiles

GPU_BLOCK = 1024
INTERPRET_BLOCK = 1 << 16


@dual_kernel
def gather_rows_kernel(table, index, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    f = tl.program_id(1)
    src = tl.load(table + 3 * f).to(tl.pointer_type(tl.uint8))
    dst = tl.load(table + 3 * f + 1).to(tl.pointer_type(tl.uint8))
    row_bytes = tl.load(table + 3 * f + 2)
    row = tl.load(index + b)
    src_row = src + row * row_bytes
    dst_row = dst + b.to(tl.int64) * row_bytes
    offs = tl.arange(0, BLOCK)
    for start in range(0, row_bytes, BLOCK):
        mask = offs < row_bytes - start
        tl.store(dst_row + start + offs, tl.load(src_row + start + offs, mask=mask), mask=mask)


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> None:
    """table: int64 [fields, 3] on index's device; index: int64 [n], already checked to be in range."""
    n, fields = index.numel(), table.shape[0]
    if n == 0 or fields == 0:
        return
    block = GPU_BLOCK if gpu_tiles(index) else INTERPRET_BLOCK
    gather_rows_kernel.launch((n, fields), index.device, table, index, BLOCK=block, num_warps=4)


AOT_CONFIGS = [
    AOTConfig(gather_rows_kernel, {"table": "*i64", "index": "*i64", "BLOCK": "constexpr"}, {"BLOCK": GPU_BLOCK},
              num_warps=4, label="gather rows"),
]
