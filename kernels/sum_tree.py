"""Triton sum-tree kernels for prioritized replay (the `triton` backend of dlcore/rl/sum_tree.py's ops).

v1 (shipped):
- sample: one lane per sample, BLOCK samples per program; the descent is a loop over the tree's levels in which
  every lane loads its two children (independent gathers the GPU overlaps); float64 like the CPU tree.
- sample_gather: the same descent, then the program copies its samples' rows of every replay field (a table of
  (src, dst, row_bytes) as in kernels/gather.py) as [BLOCK samples × CHUNK bytes] tiles: the batch and its
  transitions in one launch, the indices never leaving registers.
- update: one program (a CTA) writes the leaves, then recomputes the ancestors level by level with a barrier
  between levels — a level's parents need the level below finished, and only a CTA can wait for itself.
  Duplicate indices are resolved before the launch (the last write of each index is kept), so no two lanes write
  one leaf; lanes that share a parent write the same sum.
The reference (plain PyTorch) and the numba CPU kernel compute the same trees; tests run these kernels through
Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import torch
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, dual_helper, dual_kernel

SAMPLE_BLOCK = 256
# samples per program, bytes per row piece in the fused gather; 8 warps keep the [64, 64] tile's byte pointers at
# 16 per thread (4 warps: 250 registers)
GATHER_BLOCK, GATHER_CHUNK, GATHER_WARPS = 64, 64, 8
UPDATE_BLOCK = 1024


@dual_helper
def _descend(tree, min_tree, offsets, out_index, out_weight, b, mask, batch, size, depth, beta):
    """Stratified descent for samples b (see the module docstring); stores index and weight, returns the leaf."""
    total = tl.load(tree + 1)
    offset = tl.load(offsets + b, mask=mask, other=0.0)
    # stratum b of B: mass (b + u_b)·total/B, kept below the total (rounding must not walk off the right edge)
    mass = tl.minimum((b.to(tl.float64) + offset) * (total / batch), total * (1.0 - 2.0 ** -52))
    node = (b * 0 + 1).to(tl.int64)  # the root, one per lane
    for _ in range(depth):
        left = 2 * node
        left_sum = tl.load(tree + left, mask=mask, other=0.0)
        right_sum = tl.load(tree + left + 1, mask=mask, other=0.0)
        go_left = (mass < left_sum) | (right_sum <= 0.0)  # never into an empty (unwritten) subtree
        mass = tl.where(go_left, mass, mass - left_sum)
        node = tl.where(go_left, left, left + 1)
    leaf = tl.load(tree + node, mask=mask, other=1.0)
    p_min = tl.load(min_tree + 1)
    # w = (p / p_min)^-β, the importance weight normalised by its maximum
    weight = tl.exp(-beta * tl.log(leaf / p_min))
    tl.store(out_index + b, node - size, mask=mask)
    tl.store(out_weight + b, weight, mask=mask)
    return node - size


@dual_kernel
def sum_tree_sample_kernel(tree, min_tree, offsets, out_index, out_weight, batch, size, depth, beta,
                           BLOCK: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _descend(tree, min_tree, offsets, out_index, out_weight, b, b < batch, batch, size, depth, beta)


@dual_kernel
def sum_tree_sample_gather_kernel(tree, min_tree, offsets, out_index, out_weight, table, n_fields, batch, size,
                                  depth, beta, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = b < batch
    row = _descend(tree, min_tree, offsets, out_index, out_weight, b, mask, batch, size, depth, beta)
    offs = tl.arange(0, CHUNK)
    for f in range(n_fields):  # dst_f[b, :] = src_f[row_b, :], CHUNK bytes of BLOCK rows at a time
        src = tl.load(table + 3 * f).to(tl.pointer_type(tl.uint8))
        dst = tl.load(table + 3 * f + 1).to(tl.pointer_type(tl.uint8))
        row_bytes = tl.load(table + 3 * f + 2)
        src_rows = src + (row * row_bytes)[:, None]
        dst_rows = dst + (b.to(tl.int64) * row_bytes)[:, None]
        for start in range(0, row_bytes, CHUNK):
            piece = mask[:, None] & (offs[None, :] < row_bytes - start)
            tl.store(dst_rows + start + offs[None, :], tl.load(src_rows + start + offs[None, :], mask=piece),
                     mask=piece)


@dual_kernel
def sum_tree_update_kernel(tree, min_tree, index, value, n, size, depth, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        k = start + lanes
        mask = k < n
        leaf = size + tl.load(index + k, mask=mask, other=0)
        v = tl.load(value + k, mask=mask, other=0.0)
        tl.store(tree + leaf, v, mask=mask)
        tl.store(min_tree + leaf, tl.where(v > 0.0, v, float("inf")), mask=mask)  # a 0 leaf is never drawn
    tl.debug_barrier()
    for level in range(depth):
        for start in range(0, n, BLOCK):
            k = start + lanes
            mask = k < n
            node = (size + tl.load(index + k, mask=mask, other=0)) >> (level + 1)
            s = tl.load(tree + 2 * node, mask=mask, other=0.0) + tl.load(tree + 2 * node + 1, mask=mask, other=0.0)
            m = tl.minimum(tl.load(min_tree + 2 * node, mask=mask, other=0.0),
                           tl.load(min_tree + 2 * node + 1, mask=mask, other=0.0))
            tl.store(tree + node, s, mask=mask)
            tl.store(min_tree + node, m, mask=mask)
        tl.debug_barrier()


def _depth(size: int) -> int:
    return size.bit_length() - 1


def sample(tree: torch.Tensor, min_tree: torch.Tensor, offsets: torch.Tensor, beta: float):
    batch = offsets.numel()
    size = tree.numel() // 2
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=torch.float64, device=tree.device)
    grid = (triton_cdiv(batch, SAMPLE_BLOCK),)
    sum_tree_sample_kernel.launch(grid, tree.device, tree, min_tree, offsets, index, weight, batch, size,
                                  _depth(size), float(beta), BLOCK=SAMPLE_BLOCK, num_warps=4)
    return index, weight


def sample_gather(tree: torch.Tensor, min_tree: torch.Tensor, offsets: torch.Tensor, beta: float,
                  table: torch.Tensor):
    """sample() and, in the same launch, the rows it drew of every field in `table` (int64 [fields, 3] of
    (src, dst, row_bytes) on the tree's device; the destinations hold len(offsets) rows)."""
    batch = offsets.numel()
    size = tree.numel() // 2
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=torch.float64, device=tree.device)
    grid = (triton_cdiv(batch, GATHER_BLOCK),)
    sum_tree_sample_gather_kernel.launch(grid, tree.device, tree, min_tree, offsets, index, weight, table,
                                         table.shape[0], batch, size, _depth(size), float(beta),
                                         BLOCK=GATHER_BLOCK, CHUNK=GATHER_CHUNK, num_warps=GATHER_WARPS)
    return index, weight


def update(tree: torch.Tensor, min_tree: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """Leaves `index` ← `value` (float64, already validated; duplicates already resolved)."""
    size = tree.numel() // 2
    if index.numel():
        sum_tree_update_kernel.launch((1,), tree.device, tree, min_tree, index, value, index.numel(), size,
                                      _depth(size), BLOCK=UPDATE_BLOCK, num_warps=8)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


AOT_CONFIGS = [
    AOTConfig(sum_tree_sample_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "offsets": "*fp64", "out_index": "*i64", "out_weight": "*fp64",
               "batch": "i32", "size": "i64", "depth": "i32", "beta": "fp64", "BLOCK": "constexpr"},
              {"BLOCK": SAMPLE_BLOCK}, num_warps=4, label="sum_tree sample"),
    AOTConfig(sum_tree_sample_gather_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "offsets": "*fp64", "out_index": "*i64", "out_weight": "*fp64",
               "table": "*i64", "n_fields": "i32", "batch": "i32", "size": "i64", "depth": "i32", "beta": "fp64",
               "BLOCK": "constexpr", "CHUNK": "constexpr"},
              {"BLOCK": GATHER_BLOCK, "CHUNK": GATHER_CHUNK}, num_warps=GATHER_WARPS, label="sum_tree sample + gather"),
    AOTConfig(sum_tree_update_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "index": "*i64", "value": "*fp64", "n": "i32", "size": "i64",
               "depth": "i32", "BLOCK": "constexpr"},
              {"BLOCK": UPDATE_BLOCK}, num_warps=8, label="sum_tree update"),
]
