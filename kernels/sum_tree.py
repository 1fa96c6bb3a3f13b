"""Triton sum-tree kernels for prioritized replay (the `triton` backend of dlcore/rl/sum_tree.py's ops).

v1 (shipped):
- sample: one lane per sample, BLOCK samples per program; the descent is a loop over the tree's levels in which
  every lane loads its two children (independent gathers the GPU overlaps); float64 like the CPU tree.
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

from dlcore.kernels._triton import AOTConfig, dual_kernel

SAMPLE_BLOCK = 256
UPDATE_BLOCK = 1024


@dual_kernel
def sum_tree_sample_kernel(tree, min_tree, offsets, out_index, out_weight, batch, size, depth, beta,
                           BLOCK: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = b < batch
    total = tl.load(tree + 1)
    offset = tl.load(offsets + b, mask=mask, other=0.0)
    # stratum b of B: mass (b + u_b)·total/B, kept below the total (rounding must not walk off the right edge)
    mass = tl.minimum((b.to(tl.float64) + offset) * (total / batch), total * (1.0 - 2.0 ** -52))
    node = tl.full([BLOCK], 1, tl.int64)
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
    AOTConfig(sum_tree_update_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "index": "*i64", "value": "*fp64", "n": "i32", "size": "i64",
               "depth": "i32", "BLOCK": "constexpr"},
              {"BLOCK": UPDATE_BLOCK}, num_warps=8, label="sum_tree update"),
]
