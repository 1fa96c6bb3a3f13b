"""Triton sum-tree kernels for prioritized replay (the `triton` backend of dlcore/rl/sum_tree.py's ops).

The tree is the 8-ary layout of dlcore/rl/sum_tree.py (every third level of the binary sum-tree; a node's 8
children contiguous; `levels` holds where each level starts).

v1: binary layout, one level (two children) per step: 24 dependent steps for 10M leaves.
v2 (shipped): 8-ary layout, one step per three binary levels (8 steps for 10M).
- sample: one lane per sample, BLOCK samples per program; the descent is a loop over the tree's levels in which
  every lane loads its 8 children (64 contiguous bytes; the lanes' gathers are independent and the GPU overlaps
  them) and takes the three binary decisions from their pair sums; float64 like the CPU tree.
- sample_gather: the same descent, then the program copies its samples' rows of every replay field (a table of
  (src, dst, row_bytes) as in kernels/gather.py) as [BLOCK samples × CHUNK bytes] tiles: the batch and its
  transitions in one launch, the indices never leaving registers.
- update: one program (a CTA) writes the leaves, then recomputes the ancestors (pairwise sums of 8 children, the
  binary tree's order) level by level with a barrier
  between levels — a level's parents need the level below finished, and only a CTA can wait for itself.
  Duplicate indices are resolved before the launch (the last write of each index is kept), so no two lanes write
  one leaf; lanes that share a parent write the same sum.
The reference (plain PyTorch) and the numba CPU kernel compute the same trees; tests run these kernels through
Triton's interpreter on CPU tensors.
"""
from __future__ import annotations

import torch
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, dual_helper, dual_kernel, uniform53

SAMPLE_BLOCK = 256
# samples per program, bytes per row piece in the fused gather; 8 warps keep the [64, 64] tile's byte pointers at
# 16 per thread (4 warps: 250 registers)
GATHER_BLOCK, GATHER_CHUNK, GATHER_WARPS = 64, 64, 8
UPDATE_BLOCK = 1024


@dual_helper
def _pick(mass, left, right):
    """One binary step: right when the mass lies at or past the left sum and the right subtree is not empty."""
    go_right = (mass >= left) & (right > 0.0)
    return go_right, tl.where(go_right, mass - left, mass)


@dual_helper
def _descend(tree, min_tree, levels, offsets, out_index, out_weight, b, mask, batch, depth, beta, seed, counter,
             DRAW: tl.constexpr):
    """Stratified descent for samples b (see the module docstring); stores index and weight, returns the leaf.
    DRAW: the offsets are Philox draw `counter` under `seed` (dlcore.rl.sum_tree.draw_offsets), not loaded."""
    total = tl.load(tree)
    if DRAW:
        offset = uniform53(seed, counter, b)
    else:
        offset = tl.load(offsets + b, mask=mask, other=0.0)
    # stratum b of B: mass (b + u_b)·total/B, kept below the total (rounding must not walk off the right edge)
    mass = tl.minimum((b.to(tl.float64) + offset) * (total / batch), total * (1.0 - 2.0 ** -52))
    node = (b * 0).to(tl.int64)  # the root, one per lane
    for level in range(1, depth + 1):  # 8 children = three binary levels, decided from their pair sums
        c = tree + tl.load(levels + level) + 8 * node
        c0, c1 = tl.load(c, mask=mask, other=0.0), tl.load(c + 1, mask=mask, other=0.0)
        c2, c3 = tl.load(c + 2, mask=mask, other=0.0), tl.load(c + 3, mask=mask, other=0.0)
        c4, c5 = tl.load(c + 4, mask=mask, other=0.0), tl.load(c + 5, mask=mask, other=0.0)
        c6, c7 = tl.load(c + 6, mask=mask, other=0.0), tl.load(c + 7, mask=mask, other=0.0)
        s01, s23, s45, s67 = c0 + c1, c2 + c3, c4 + c5, c6 + c7
        r1, mass = _pick(mass, s01 + s23, s45 + s67)
        r2, mass = _pick(mass, tl.where(r1, s45, s01), tl.where(r1, s67, s23))
        x = tl.where(r1, tl.where(r2, c6, c4), tl.where(r2, c2, c0))
        y = tl.where(r1, tl.where(r2, c7, c5), tl.where(r2, c3, c1))
        r3, mass = _pick(mass, x, y)
        node = 8 * node + 4 * r1.to(tl.int64) + 2 * r2.to(tl.int64) + r3.to(tl.int64)
    leaf = tl.load(tree + tl.load(levels + depth) + node, mask=mask, other=1.0)
    p_min = tl.load(min_tree)
    # w = (p / p_min)^-β, the importance weight normalised by its maximum
    weight = tl.exp(-beta * tl.log(leaf / p_min))
    tl.store(out_index + b, node, mask=mask)
    tl.store(out_weight + b, weight, mask=mask)
    return node


@dual_kernel
def sum_tree_sample_kernel(tree, min_tree, levels, offsets, out_index, out_weight, batch, depth, beta, seed, counter,
                           BLOCK: tl.constexpr, DRAW: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _descend(tree, min_tree, levels, offsets, out_index, out_weight, b, b < batch, batch, depth, beta, seed, counter,
             DRAW)


@dual_kernel
def sum_tree_sample_gather_kernel(tree, min_tree, levels, offsets, out_index, out_weight, table, n_fields, batch,
                                  depth, beta, seed, counter, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                                  DRAW: tl.constexpr):
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = b < batch
    row = _descend(tree, min_tree, levels, offsets, out_index, out_weight, b, mask, batch, depth, beta, seed, counter,
                   DRAW)
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
def sum_tree_update_kernel(tree, min_tree, levels, index, value, n, depth, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    leaf0 = tl.load(levels + depth)
    for start in range(0, n, BLOCK):
        k = start + lanes
        mask = k < n
        leaf = leaf0 + tl.load(index + k, mask=mask, other=0)
        v = tl.load(value + k, mask=mask, other=0.0)
        tl.store(tree + leaf, v, mask=mask)
        tl.store(min_tree + leaf, tl.where(v > 0.0, v, float("inf")), mask=mask)  # a 0 leaf is never drawn
    tl.debug_barrier()
    for up in range(1, depth + 1):  # level depth - up, from the 8 children below; lanes sharing a node agree
        base = tl.load(levels + depth - up)
        children = tl.load(levels + depth - up + 1)
        for start in range(0, n, BLOCK):
            k = start + lanes
            mask = k < n
            node = tl.load(index + k, mask=mask, other=0) >> (3 * up)
            c = children + 8 * node
            t0, t1 = tl.load(tree + c, mask=mask, other=0.0), tl.load(tree + c + 1, mask=mask, other=0.0)
            t2, t3 = tl.load(tree + c + 2, mask=mask, other=0.0), tl.load(tree + c + 3, mask=mask, other=0.0)
            t4, t5 = tl.load(tree + c + 4, mask=mask, other=0.0), tl.load(tree + c + 5, mask=mask, other=0.0)
            t6, t7 = tl.load(tree + c + 6, mask=mask, other=0.0), tl.load(tree + c + 7, mask=mask, other=0.0)
            m01 = tl.minimum(tl.load(min_tree + c, mask=mask, other=0.0),
                             tl.load(min_tree + c + 1, mask=mask, other=0.0))
            m23 = tl.minimum(tl.load(min_tree + c + 2, mask=mask, other=0.0),
                             tl.load(min_tree + c + 3, mask=mask, other=0.0))
            m45 = tl.minimum(tl.load(min_tree + c + 4, mask=mask, other=0.0),
                             tl.load(min_tree + c + 5, mask=mask, other=0.0))
            m67 = tl.minimum(tl.load(min_tree + c + 6, mask=mask, other=0.0),
                             tl.load(min_tree + c + 7, mask=mask, other=0.0))
            # pairwise, the binary tree's sums: ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7))
            tl.store(tree + base + node, ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)), mask=mask)
            tl.store(min_tree + base + node, tl.minimum(tl.minimum(m01, m23), tl.minimum(m45, m67)), mask=mask)
        tl.debug_barrier()


def sample(tree: torch.Tensor, min_tree: torch.Tensor, levels: torch.Tensor, offsets, seed: int, counter: int,
           batch: int, beta: float):
    """Leaf index and weight of each of `batch` strata. offsets: float64 [batch] on the tree's device, or None:
    drawn in the kernel (Philox draw `counter` under `seed`; the tree stands in for the unused pointer)."""
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=torch.float64, device=tree.device)
    grid = (triton_cdiv(batch, SAMPLE_BLOCK),)
    sum_tree_sample_kernel.launch(grid, tree.device, tree, min_tree, levels, tree if offsets is None else offsets,
                                  index, weight, batch, levels.numel() - 2, float(beta), seed, counter,
                                  BLOCK=SAMPLE_BLOCK, DRAW=offsets is None, num_warps=4)
    return index, weight


def sample_gather(tree: torch.Tensor, min_tree: torch.Tensor, levels: torch.Tensor, offsets, seed: int,
                  counter: int, batch: int, beta: float, table: torch.Tensor, weight_dtype: torch.dtype = torch.float64):
    """sample() and, in the same launch, the rows it drew of every field in `table` (int64 [fields, 3] of
    (src, dst, row_bytes) on the tree's device; the destinations hold the batch's rows). The weight is computed in
    float64 and stored in weight_dtype (float32: rounded once, by the store)."""
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=weight_dtype, device=tree.device)
    grid = (triton_cdiv(batch, GATHER_BLOCK),)
    sum_tree_sample_gather_kernel.launch(grid, tree.device, tree, min_tree, levels,
                                         tree if offsets is None else offsets, index, weight, table, table.shape[0],
                                         batch, levels.numel() - 2, float(beta), seed, counter, BLOCK=GATHER_BLOCK,
                                         CHUNK=GATHER_CHUNK, DRAW=offsets is None, num_warps=GATHER_WARPS)
    return index, weight


def update(tree: torch.Tensor, min_tree: torch.Tensor, levels: torch.Tensor, index: torch.Tensor,
           value: torch.Tensor) -> None:
    """Leaves `index` ← `value` (float64, already validated; duplicates already resolved)."""
    if index.numel():
        sum_tree_update_kernel.launch((1,), tree.device, tree, min_tree, levels, index, value, index.numel(),
                                      levels.numel() - 2, BLOCK=UPDATE_BLOCK, num_warps=8)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


AOT_CONFIGS = [
    AOTConfig(sum_tree_sample_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "levels": "*i64", "offsets": "*fp64", "out_index": "*i64",
               "out_weight": "*fp64", "batch": "i32", "depth": "i32", "beta": "fp64", "seed": "i64", "counter": "i64",
               "BLOCK": "constexpr", "DRAW": "constexpr"},
              {"BLOCK": SAMPLE_BLOCK, "DRAW": False}, num_warps=4, label="sum_tree sample"),
    AOTConfig(sum_tree_sample_gather_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "levels": "*i64", "offsets": "*fp64", "out_index": "*i64",
               "out_weight": "*fp32", "table": "*i64", "n_fields": "i32", "batch": "i32", "depth": "i32",
               "beta": "fp64", "seed": "i64", "counter": "i64", "BLOCK": "constexpr", "CHUNK": "constexpr",
               "DRAW": "constexpr"},
              {"BLOCK": GATHER_BLOCK, "CHUNK": GATHER_CHUNK, "DRAW": True}, num_warps=GATHER_WARPS,
              label="sum_tree sample + gather (offsets drawn in the kernel: the replay buffers' path)"),
    AOTConfig(sum_tree_update_kernel,
              {"tree": "*fp64", "min_tree": "*fp64", "levels": "*i64", "index": "*i64", "value": "*fp64", "n": "i32",
               "depth": "i32", "BLOCK": "constexpr"},
              {"BLOCK": UPDATE_BLOCK}, num_warps=8, label="sum_tree update"),
]
