"""Sum-tree (and min-tree) for proportional prioritized replay: the ops behind dlcore.rl.PrioritizedReplayBuffer.

What is computed is the classic binary sum-tree over the leaves (zero-padded to a power of two): every node the
float64 sum of its two children, every descent going right when the mass lies at or past the left sum and the right
subtree is not empty. What is stored is every third level of it, as an 8-ary tree: a node's 8 children are the
binary nodes three levels down, contiguous and 64-byte aligned (one cache line), and a node is the pairwise sum
((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)), bit-identical to the binary node. A descent reads one line per 8-ary level
and takes the three binary decisions inside it from the pair sums, so it returns exactly the binary tree's leaf
while touching 7 lines for 1M leaves instead of ~20 (a binary tree of 1M leaves is 16 MB, past the caches
between two learner steps; this one is 9.6 MB, 8 of it leaves).

Layout (`tree_layout`): level l (root l = 0, leaves l = D, 8^D ≥ capacity) holds the children blocks of level
l - 1's nodes: level l starts at levels[l], node j of level l is at levels[l] + j, its children at
levels[l + 1] + 8j + c; levels[D + 1] is the length. The root is at [0] (level 0 is one padded block of 8).
Unwritten leaves and padding hold 0 (sum tree) and +inf (min tree); so does a leaf written with 0 (priority 0 with
eps 0 and alpha 1): it can never be drawn, so it does not count in p_min. The frame-stack buffer uses that to take
a slot out of sampling.

Three ops behind the dispatch point, each with a C++ twin (`cpu`, csrc/cpu/sum_tree.cpp: prefetching descents and
updates, both on two threads from a batch of 128, sample and gather in one call), numba kernels (`numba`), Triton
and CUDA C++ kernels for GPUs, and a plain-PyTorch reference; the CPU ones are one call from Python, validation
included, because the targets are a few microseconds. `cpu` and `numba` compute the same trees and draws bit for
bit (`levels`: the int64 tensor of tree_layout(capacity), on the tree's device):
  sum_tree_sample(tree, min_tree, levels, offsets, beta) -> (leaf index, importance weight)
      stratified: target mass (b + offsets[b])·total/B for b < B, one descent each; weight (p_i / p_min)^-β
  sum_tree_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype=float64)
      -> (leaf index, weight, rows of each source); the weight computed in float64, returned in weight_dtype
      the sample and the replay batch's gather in one call: one kernel launch on a GPU (triton, cuda), one C++
      call on the CPU (numba: its descent, then the C++ gather_rows). The cpu, cuda and triton launchers also take
      a `Draw(seed, counter, batch)` for offsets: Philox numbers (`draw_offsets`) drawn inside the kernel, which is
      how the replay buffers sample (`SumTree.sample_gather_drawn`): no offsets tensor, no copy to a GPU
  sum_tree_update(tree, min_tree, levels, index, priority, eps, alpha, limit) -> (status, max of priority + eps)
      (priority float64 or float32, widened exactly before any arithmetic)
      leaf ← (priority + eps)^alpha (the last write of a duplicate index wins), then every ancestor is recomputed
      from its children; status 1: a priority is negative or not finite, 2: an index is outside [0, limit);
      nothing is written unless status is 0
Descents and ancestor updates run level by level across the whole batch, so the cache misses of one level are
independent loads the CPU overlaps (one descent at a time waits for each miss in turn); levels with no more nodes
than the batch has updates are recomputed whole, in memory order. Ancestors are recomputed
rather than adjusted by deltas: after any number of updates the root is the tree-ordered float64 sum of the
leaves (relative error ≤ log2(size)·2⁻⁵³), no drift.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from dlcore import _dispatch, _ext
from dlcore._philox import uniform53
from dlcore.rl import _memory
from dlcore.rl.gather import _outputs, _row_bytes, cpu_gather_rows

SAMPLE_OP, UPDATE_OP, SAMPLE_GATHER_OP = "sum_tree_sample", "sum_tree_update", "sum_tree_sample_gather"
_dispatch.define_op(SAMPLE_OP, gpu_order=("cuda", "triton"))  # not yet measured on a GPU
_dispatch.define_op(UPDATE_OP, gpu_order=("cuda", "triton"))
_dispatch.define_op(SAMPLE_GATHER_OP, gpu_order=("cuda", "triton"))
BAD_PRIORITY, BAD_INDEX = 1, 2
ARITY = 8  # children per stored node: three binary levels, 64 bytes of float64

try:
    import numba

    _numba_error = None
except ImportError as exc:  # reported by `dlcore info`, never faked
    numba = None
    _numba_error = f"numba is not installed: {exc}"


_INDEX_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})


def as_vector(x, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """x as a contiguous 1-D tensor of dtype on device; a tensor that already is one is returned as it is (the
    replay ops are a few microseconds, and each conversion call costs one)."""
    if type(x) is torch.Tensor and x.dim() == 1 and x.is_contiguous():
        # a TD-error vector in another dtype: one conversion call (to() of a 1-D contiguous tensor stays so)
        return x if x.dtype == dtype and x.device == device else x.to(device, dtype)
    return torch.as_tensor(x).reshape(-1).to(device, dtype).contiguous()


class Draw(NamedTuple):
    """A sample's offsets given as Philox draw `counter` under `seed` (the numbers `draw_offsets` returns), `batch`
    of them: the cpu, cuda and triton launchers take one in place of the offsets tensor and draw them in their
    kernels (no tensor made, nothing copied to a GPU); the others are given draw_offsets' tensor."""
    seed: int
    counter: int
    batch: int


def _offsets_on(offsets, device) -> tuple[Optional[torch.Tensor], int, int, int]:
    """(offsets tensor on `device` or None (drawn in the kernel), seed, counter, batch) of an offsets tensor or a
    Draw: what every launcher that takes a Draw passes on."""
    if isinstance(offsets, Draw):
        return None, offsets.seed, offsets.counter, offsets.batch
    return offsets.to(device).contiguous(), 0, 0, offsets.numel()


def tree_layout(capacity: int) -> list[int]:
    """levels[l] = where level l starts (root l = 0, leaves l = D), levels[D + 1] = the tree's length; see the
    module docstring. Level l ≥ 1 holds 8 slots per node of level l - 1; nodes per level = ceil(capacity / 8^(D-l))."""
    nodes = [max(1, int(capacity))]  # leaves first, then each level above, up to a single root
    while nodes[-1] > 1 or len(nodes) == 1:
        nodes.append(-(-nodes[-1] // ARITY))
    nodes.reverse()  # nodes[0] == 1 (root) ... nodes[D] == capacity
    levels, start = [0], ARITY  # the root's level is one block, so every level stays 64-byte aligned
    for l in range(1, len(nodes)):
        levels.append(start)
        start += ARITY * nodes[l - 1]
    return levels + [start]


# ---------------------------------------------------------------------------------------------------- reference
def _leaves(tree, levels):
    return tree[int(levels[-2]):int(levels[-1])]


def reference_sample(tree, min_tree, levels, offsets, beta):
    batch = offsets.numel()
    total = tree[0]
    mass = (torch.arange(batch, dtype=torch.float64) + offsets) * (total / batch)
    mass = torch.minimum(mass, total * (1 - 2 ** -52))  # at or past the total: the last positive leaf
    leaves = _leaves(tree, levels.tolist())
    cumulative = torch.cumsum(leaves, 0)  # (summed in another order than the tree: its total may differ by ulps)
    last_positive = int(torch.nonzero(leaves > 0).max())
    index = torch.searchsorted(cumulative, mass, right=True).clamp_(max=last_positive)  # skips zero leaves
    weight = (leaves[index] / min_tree[0]).pow(-beta)
    return index, weight


def _check(index, priority, limit) -> int:
    """The update's status code, from tensor ops (one host sync each)."""
    if not bool(((priority >= 0) & (priority < float("inf"))).all()):
        return BAD_PRIORITY
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= limit):
        return BAD_INDEX
    return 0


def rebuild(tree, min_tree, levels) -> None:
    """Every node from its children, level by level up from the leaves: pair sums three times, ((c0+c1)+(c2+c3)) +
    ((c4+c5)+(c6+c7)), the binary tree's order (a sum of two is one rounding whatever the reduction order)."""
    levels = [int(v) for v in levels]
    for l in range(len(levels) - 3, -1, -1):
        children = slice(levels[l + 1], levels[l + 2])
        s, m = tree[children], min_tree[children]
        for _ in range(3):
            s, m = s.view(-1, 2).sum(1), m.view(-1, 2).amin(1)
        tree[levels[l]:levels[l] + s.numel()] = s
        min_tree[levels[l]:levels[l] + m.numel()] = m


def reference_update(tree, min_tree, levels, index, priority, eps, alpha, limit):
    priority = priority.double()
    status = _check(index, priority, limit)
    if status:
        return status, 0.0
    leaf0 = int(levels[-2])
    value = (priority + eps).pow(alpha)
    for i, v in zip(index.tolist(), value.tolist()):  # in order: the last write of a duplicate wins
        tree[leaf0 + i] = v
        min_tree[leaf0 + i] = v if v > 0 else float("inf")
    rebuild(tree, min_tree, levels.tolist())
    return 0, float((priority + eps).max()) if priority.numel() else 0.0


_dispatch.register(SAMPLE_OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.float64,))(reference_sample)


def _gather_table(sources, n):
    """Outputs [n, ...] for each source and the (src, dst, row_bytes) table the fused GPU kernels read."""
    outs = _outputs(sources, n)
    table = torch.tensor([[s.data_ptr(), o.data_ptr(), _row_bytes(s)] for s, o in zip(sources, outs)],
                         dtype=torch.int64)
    return outs, table


@_dispatch.register(SAMPLE_GATHER_OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.float64,))
def reference_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype=torch.float64):
    index, weight = reference_sample(tree, min_tree, levels, offsets, beta)
    return index, weight.to(weight_dtype), [s.index_select(0, index.to(s.device)) for s in sources]
_dispatch.register(UPDATE_OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.float64,))(reference_update)


def _resolve_duplicates(index, priority, eps, alpha):
    """(unique index, its last-written leaf value): the last write of a duplicate index wins, decided before a
    parallel kernel runs so that no two lanes write one leaf."""
    unique, inverse = torch.unique(index, return_inverse=True)
    position = torch.arange(index.numel(), device=index.device)
    last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, position, reduce="amax")
    return unique.contiguous(), (priority[last] + eps).pow(alpha).contiguous()


def _parallel_update(kernel_update):
    """An update launcher around a parallel kernel: validation and duplicate resolution with tensor ops first."""
    def launch(tree, min_tree, levels, index, priority, eps, alpha, limit):
        index, priority = index.to(tree.device), priority.to(tree.device, torch.float64)
        status = _check(index, priority, limit)
        if status:
            return status, 0.0
        if index.numel() == 0:
            return 0, 0.0
        kernel_update(tree, min_tree, levels, *_resolve_duplicates(index, priority, eps, alpha))
        return 0, float((priority + eps).max())

    return launch


# ---------------------------------------------------------------------------------------------------- cuda


def _cuda_update_kernel(tree, min_tree, levels, index, value):
    with torch.cuda.device(tree.device):
        _ext.cuda.sum_tree_update(tree.data_ptr(), min_tree.data_ptr(), levels.data_ptr(), levels.numel() - 2,
                                  index.data_ptr(), value.data_ptr(), index.numel(), _ext.cuda_stream(tree.device))


@_dispatch.register(SAMPLE_OP, "cuda", devices=("cuda",), dtypes=(torch.float64,), available=_ext.cuda_unavailable)
def cuda_sample(tree, min_tree, levels, offsets, beta):
    offsets, seed, counter, batch = _offsets_on(offsets, tree.device)
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=torch.float64, device=tree.device)
    with torch.cuda.device(tree.device):
        _ext.cuda.sum_tree_sample(tree.data_ptr(), min_tree.data_ptr(), levels.data_ptr(), levels.numel() - 2,
                                  0 if offsets is None else offsets.data_ptr(), index.data_ptr(), weight.data_ptr(),
                                  batch, float(beta), _ext.cuda_stream(tree.device), seed, counter)
    return index, weight


_dispatch.register(UPDATE_OP, "cuda", devices=("cuda",), dtypes=(torch.float64,),
                   available=_ext.cuda_unavailable)(_parallel_update(_cuda_update_kernel))


CUDA_MAX_FIELDS = 16  # csrc/cuda/sum_tree.cu kMaxFields: the fields' addresses travel as kernel parameters


@_dispatch.register(SAMPLE_GATHER_OP, "cuda", devices=("cuda",), dtypes=(torch.float64,),
                    available=_ext.cuda_unavailable)
def cuda_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype=torch.float64):
    if len(sources) > CUDA_MAX_FIELDS:  # (a replay transition of more fields: the Triton kernel reads a table)
        return triton_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype)
    offsets, seed, counter, batch = _offsets_on(offsets, tree.device)
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=weight_dtype, device=tree.device)  # the kernel stores either dtype
    outs = _outputs(sources, batch)
    with torch.cuda.device(tree.device):
        _ext.cuda.sum_tree_sample_gather(tree.data_ptr(), min_tree.data_ptr(), levels.data_ptr(), levels.numel() - 2,
                                         0 if offsets is None else offsets.data_ptr(), index.data_ptr(),
                                         weight.data_ptr(), weight_dtype == torch.float32,
                                         [s.data_ptr() for s in sources], [o.data_ptr() for o in outs],
                                         [_row_bytes(s) for s in sources], batch, float(beta),
                                         _ext.cuda_stream(tree.device), seed, counter)
    return index, weight, outs


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(SAMPLE_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.float64,),
                    available=_ext.triton_unavailable("sum_tree"))
def triton_sample(tree, min_tree, levels, offsets, beta):
    from dlcore.kernels import sum_tree as kernel

    return kernel.sample(tree, min_tree, levels, *_offsets_on(offsets, tree.device), beta)


@_dispatch.register(SAMPLE_GATHER_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.float64,),
                    available=_ext.triton_unavailable("sum_tree"))
def triton_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype=torch.float64):
    from dlcore.kernels import sum_tree as kernel

    offsets, seed, counter, batch = _offsets_on(offsets, tree.device)
    outs, table = _gather_table(sources, batch)
    index, weight = kernel.sample_gather(tree, min_tree, levels, offsets, seed, counter, batch, beta,
                                         table.to(tree.device), weight_dtype)
    return index, weight, outs


def _triton_update_kernel(tree, min_tree, levels, index, value):
    from dlcore.kernels import sum_tree as kernel

    kernel.update(tree, min_tree, levels, index, value)


_dispatch.register(UPDATE_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.float64,),
                   available=_ext.triton_unavailable("sum_tree"))(_parallel_update(_triton_update_kernel))


# ---------------------------------------------------------------------------------------------------- numba (CPU)
if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _pick(m, left, right):
        """One binary step: (go right?, mass left over). Right when the mass lies at or past the left sum and the
        right subtree is not empty (rounding can leave a mass just past the left sum): an unwritten (zero) leaf is
        never returned. Selects, not branches: the direction is a coin flip the CPU cannot predict."""
        right_ = (m >= left) & (right > 0.0)
        return right_, m - (left if right_ else 0.0)

    @numba.njit(cache=True, nogil=True)
    def _sample_kernel(tree, min_tree, levels, offsets, beta, out_index, out_weight):
        depth = levels.shape[0] - 2
        batch = offsets.shape[0]
        total = tree[0]
        node = np.zeros(batch, dtype=np.int64)
        mass = np.empty(batch, dtype=np.float64)
        for b in range(batch):
            mass[b] = min((b + offsets[b]) * (total / batch), total * (1.0 - 2.0 ** -52))
        for level in range(1, depth + 1):  # one 8-ary level (three binary levels) of every descent per pass
            base = levels[level]
            for b in range(batch):
                c = base + 8 * node[b]
                s01, s23 = tree[c] + tree[c + 1], tree[c + 2] + tree[c + 3]
                s45, s67 = tree[c + 4] + tree[c + 5], tree[c + 6] + tree[c + 7]
                r1, m = _pick(mass[b], s01 + s23, s45 + s67)
                r2, m = _pick(m, s45 if r1 else s01, s67 if r1 else s23)
                k = 4 * np.int64(r1) + 2 * np.int64(r2)
                r3, m = _pick(m, tree[c + k], tree[c + k + 1])
                node[b] = 8 * node[b] + k + np.int64(r3)
                mass[b] = m
        leaf0 = levels[depth]
        inv_min = 1.0 / min_tree[0]
        for b in range(batch):
            out_index[b] = node[b]
            out_weight[b] = (tree[leaf0 + node[b]] * inv_min) ** (-beta)

    @numba.njit(cache=True, nogil=True, inline="always")
    def _recompute(tree, min_tree, node, c):
        """tree[node] and min_tree[node] from the 8 children at c, pairwise (the binary tree's sums)."""
        tree[node] = (((tree[c] + tree[c + 1]) + (tree[c + 2] + tree[c + 3]))
                      + ((tree[c + 4] + tree[c + 5]) + (tree[c + 6] + tree[c + 7])))
        m = min_tree[c]
        for i in range(1, 8):
            m = min(m, min_tree[c + i])
        min_tree[node] = m

    @numba.njit(cache=True, nogil=True)
    def _update_kernel(tree, min_tree, levels, index, priority, eps, alpha, limit):
        depth = levels.shape[0] - 2
        n = index.shape[0]
        top = 0.0
        for k in range(n):  # validate everything before writing anything
            p = priority[k]
            if not (p >= 0.0 and p < np.inf):
                return BAD_PRIORITY, 0.0
            if index[k] < 0 or index[k] >= limit:
                return BAD_INDEX, 0.0
            top = max(top, p + eps)
        node = np.empty(n, dtype=np.int64)
        leaf0 = levels[depth]
        for k in range(n):
            v = (priority[k] + eps) ** alpha
            tree[leaf0 + index[k]] = v
            min_tree[leaf0 + index[k]] = v if v > 0.0 else np.inf
            node[k] = index[k] // 8
        for level in range(depth - 1, -1, -1):  # every touched ancestor, one level per pass
            base, children = levels[level], levels[level + 1]
            width = (levels[level + 2] - children) // 8  # nodes of this level
            if width > n:
                for k in range(n):
                    j = node[k]
                    _recompute(tree, min_tree, base + j, children + 8 * j)
                    node[k] = j // 8
            else:  # no more nodes than updates: all of them, in memory order (same sums, no scatter)
                for j in range(width):
                    _recompute(tree, min_tree, base + j, children + 8 * j)
        return 0, top


def _numba_available():
    return _numba_error


@_dispatch.register(SAMPLE_OP, "numba", devices=("cpu",), dtypes=(torch.float64,), available=_numba_available)
def numba_sample(tree, min_tree, levels, offsets, beta):
    index = np.empty(offsets.numel(), dtype=np.int64)
    weight = np.empty(offsets.numel(), dtype=np.float64)
    _sample_kernel(tree.numpy(), min_tree.numpy(), levels.numpy(), offsets.numpy(), float(beta), index, weight)
    return torch.from_numpy(index), torch.from_numpy(weight)


@_dispatch.register(SAMPLE_GATHER_OP, "numba", devices=("cpu",), dtypes=(torch.float64,),
                    available=_numba_available)
def numba_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype=torch.float64):
    index, weight = numba_sample(tree, min_tree, levels, offsets, beta)
    return index, weight.to(weight_dtype), cpu_gather_rows(sources, index, min(s.shape[0] for s in sources))


@_dispatch.register(UPDATE_OP, "numba", devices=("cpu",), dtypes=(torch.float64,), available=_numba_available)
def numba_update(tree, min_tree, levels, index, priority, eps, alpha, limit):
    return _update_kernel(tree.numpy(), min_tree.numpy(), levels.numpy(), index.numpy(), priority.numpy(),
                          float(eps), float(alpha), int(limit))


# ---------------------------------------------------------------------------------------------------- C++ (CPU)
class GatherPlan:
    """What gathering rows of a fixed list of `sources` on the CPU needs, computed once: their addresses, row
    sizes, the rows all of them have, and the outputs' shapes and dtypes (at ~1 µs a Python-level tensor call on
    the slow VMs, finding these per sample cost ~5 of its ~35 µs). It holds raw addresses, valid while `sources`
    live unchanged: a replay buffer makes one per storage and drops it when copied or pickled."""

    __slots__ = ("sources", "src_addrs", "row_bytes", "limit", "out_specs")

    def __init__(self, sources):
        self.sources = list(sources)
        self.src_addrs = [s.data_ptr() for s in self.sources]
        self.row_bytes = [_row_bytes(s) for s in self.sources]
        self.limit = min((s.shape[0] for s in self.sources), default=0)
        self.out_specs = [(tuple(s.shape[1:]), s.dtype) for s in self.sources]

    def outputs(self, batch: int) -> tuple[list[torch.Tensor], list[int]]:
        """New tensors [batch, ...] for every source's rows, and their addresses."""
        # sizes as separate ints: a size tuple costs ~0.35 µs more per call in torch's argument parser
        outs = [torch.empty(batch, *shape, dtype=dtype) for shape, dtype in self.out_specs]
        return outs, [o.data_ptr() for o in outs]


def _cpu_sample_gather(tree, min_tree, levels, offsets, beta, sources, weight_dtype=torch.float64):
    """The C++ sample and gather. offsets: a tensor, or a Draw (the C++ draws them); sources: a list of tensors or
    their GatherPlan (a replay buffer's, made once)."""
    plan = sources if isinstance(sources, GatherPlan) else GatherPlan(sources)
    offsets, seed, counter, batch = _offsets_on(offsets, tree.device)
    index = torch.empty(batch, dtype=torch.int64)
    weight = torch.empty(batch, dtype=weight_dtype)  # written in either dtype by the C++ (saves a conversion call)
    outs, out_addrs = plan.outputs(batch)
    status = _ext.cpu.sum_tree_sample_gather(
        tree.data_ptr(), min_tree.data_ptr(), levels.data_ptr(), levels.numel() - 2,
        0 if offsets is None else offsets.data_ptr(), batch, float(beta),
        index.data_ptr(), weight.data_ptr(), weight_dtype == torch.float32, plan.src_addrs, out_addrs,
        plan.row_bytes, plan.limit, seed, counter)
    if status:  # a drawn leaf past a source's rows: the caller's sources are shorter than the tree's written part
        raise IndexError(f"sampled index {int(index.max())} is past the rows of a source ({plan.limit})")
    return index, weight, outs


_DRAWS_OFFSETS = ("cpu", "cuda", "triton")  # launchers of SAMPLE_OP and SAMPLE_GATHER_OP that take a Draw


def draw_offsets(seed: int, counter: int, n: int) -> torch.Tensor:
    """The offsets of a replay buffer's draw `counter` under `seed`: float64 [n] in [0, 1) on the CPU, Philox
    (dlcore._philox.uniform53; the C++ fills them when it is built, the same doubles)."""
    if _ext.cpu_unavailable() is not None:
        return uniform53(seed, counter, n)
    out = torch.empty(n, dtype=torch.float64)
    _ext.cpu.sum_tree_draw_offsets(seed, counter, n, out.data_ptr())
    return out


@_dispatch.register(SAMPLE_OP, "cpu", devices=("cpu",), dtypes=(torch.float64,), available=_ext.cpu_unavailable)
def cpu_sample(tree, min_tree, levels, offsets, beta):
    index, weight, _ = _cpu_sample_gather(tree, min_tree, levels, offsets, beta, [])
    return index, weight


_dispatch.register(SAMPLE_GATHER_OP, "cpu", devices=("cpu",), dtypes=(torch.float64,),
                   available=_ext.cpu_unavailable)(_cpu_sample_gather)


@_dispatch.register(UPDATE_OP, "cpu", devices=("cpu",), dtypes=(torch.float64,), available=_ext.cpu_unavailable)
def cpu_update(tree, min_tree, levels, index, priority, eps, alpha, limit):
    return _ext.cpu.sum_tree_update(tree.data_ptr(), min_tree.data_ptr(), levels.data_ptr(), levels.numel() - 2,
                                    index.data_ptr(), priority.data_ptr(), priority.dtype is torch.float32,
                                    index.numel(), float(eps), float(alpha), int(limit))


# ---------------------------------------------------------------------------------------------------- the tree
class SumTree:
    """Sum and min trees over `capacity` leaves (float64) on `device`, in the 8-ary layout of the module docstring:
    the C++ (or numba) kernels on the CPU, the Triton or CUDA kernels on a GPU (dispatch as for every op)."""

    def __init__(self, capacity: int, device: "str | torch.device" = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        layout = tree_layout(self.capacity)
        self.leaf_offset = layout[-2]
        self.levels = torch.tensor(layout, dtype=torch.int64, device=self.device)  # every op takes it beside the tree
        self.sum = _memory.zeros((layout[-1],), torch.float64, self.device)  # huge pages on Linux hosts
        self.min = _memory.full((layout[-1],), float("inf"), torch.float64, self.device)

    def __repr__(self) -> str:
        return f"SumTree(capacity={self.capacity}, device={self.device})"

    @property
    def total(self) -> float:
        return float(self.sum[0])

    @property
    def min_leaf(self) -> float:
        return float(self.min[0])

    @property
    def leaf_values(self) -> torch.Tensor:
        """The `capacity` leaves (a view)."""
        return self.sum[self.leaf_offset:self.leaf_offset + self.capacity]

    def leaves(self, index: torch.Tensor) -> torch.Tensor:
        return self.sum[self.leaf_offset + index]

    def update(self, index, priority, eps: float = 0.0, alpha: float = 1.0, limit: int | None = None) -> float:
        """Leaves `index` ← (priority + eps)^alpha. Raises on a negative or non-finite priority or an index outside
        [0, limit) (default: capacity), before writing anything. Returns max(priority + eps)."""
        # a learner's usual call (int64 indices, fp32 or fp64 |TD errors|, 1-D and contiguous on the tree's device)
        # goes straight on: the conversions' checks cost ~1 µs of a ~7 µs update on the CPU
        if not (type(index) is torch.Tensor and type(priority) is torch.Tensor and index.dtype is torch.int64
                and (priority.dtype is torch.float32 or priority.dtype is torch.float64) and index.ndim == 1
                and priority.ndim == 1 and index.is_contiguous() and priority.is_contiguous()
                and index.device == self.device and priority.device == self.device):
            index, priority = self._update_vectors(index, priority)
        if index.numel() != priority.numel():
            raise ValueError(f"index has {index.numel()} entries but priority has {priority.numel()}")
        limit = self.capacity if limit is None else int(limit)
        _, launch = _dispatch.select(UPDATE_OP, self.device, torch.float64)
        status, top = launch(self.sum, self.min, self.levels, index, priority, eps, alpha, limit)
        if status == BAD_PRIORITY:
            raise ValueError("priorities must be finite and non-negative (pass |TD error|)")
        if status == BAD_INDEX:
            raise IndexError(f"index out of range [0, {limit}): min {int(index.min())}, max {int(index.max())}")
        return top

    def _update_vectors(self, index, priority) -> tuple[torch.Tensor, torch.Tensor]:
        """index as int64 and priority as fp32 (kept: the kernels widen it exactly) or fp64, 1-D contiguous on the
        tree's device."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.dtype not in _INDEX_DTYPES:
            raise TypeError(f"index must hold integer positions, got {index.dtype}")
        wide = torch.float32 if isinstance(priority, torch.Tensor) and priority.dtype == torch.float32 else torch.float64
        return as_vector(index, torch.int64, self.device), as_vector(priority, wide, self.device)

    def check_saved(self, tree_sum: torch.Tensor, tree_min: torch.Tensor) -> None:
        """Raise ValueError unless saved trees have this tree's capacity and layout."""
        if tree_sum.shape != self.sum.shape or tree_min.shape != self.min.shape:
            raise ValueError(f"saved sum-tree has {tree_sum.numel()} nodes; a tree of capacity {self.capacity} in "
                             f"the 8-ary layout has {self.sum.numel()} (saved by another layout or capacity)")

    def load_trees(self, tree_sum: torch.Tensor, tree_min: torch.Tensor) -> None:
        """Copy in trees saved from a SumTree of the same capacity (`check_saved` first)."""
        self.check_saved(tree_sum, tree_min)
        self.sum.copy_(tree_sum)
        self.min.copy_(tree_min)

    def sample_gather(self, offsets: torch.Tensor, beta: float, sources: list[torch.Tensor],
                      weight_dtype: torch.dtype = torch.float64):
        """sample(), plus rows `index` of every tensor in `sources` (contiguous, on the tree's device, at least as
        many rows as the leaves that can be drawn): (index, weight in weight_dtype (float64 or float32, computed in
        float64), [rows of each source])."""
        if weight_dtype not in (torch.float64, torch.float32):
            raise TypeError(f"weight_dtype must be torch.float64 or torch.float32, got {weight_dtype}")
        offsets = as_vector(offsets, torch.float64, self.device)
        rows = min((s.shape[0] for s in sources), default=self.capacity)
        # a source shorter than the tree: refused up front when a leaf past its rows can be drawn (non-zero), since
        # the GPU kernels copy rows unchecked (a read past the source); the usual sources (a buffer's storage,
        # `capacity` rows) skip the test
        if rows < self.capacity and bool(self.leaf_values[rows:].any()):
            raise IndexError(f"a source has {rows} rows, but leaves from {rows} on can be drawn (non-zero)")
        _, launch = _dispatch.select(SAMPLE_GATHER_OP, self.device, torch.float64)
        return launch(self.sum, self.min, self.levels, offsets, beta, sources, weight_dtype)

    def sample_gather_drawn(self, seed: int, counter: int, batch: int, beta: float, plan: GatherPlan,
                            weight_dtype: torch.dtype = torch.float64):
        """sample_gather(draw_offsets(seed, counter, batch), beta, plan.sources, weight_dtype): a replay buffer's
        sample (its storage is the plan's sources, `capacity` rows, so the short-source test is not needed). The
        cpu, cuda and triton kernels draw the offsets themselves; the others are given them."""
        backend, launch = _dispatch.select(SAMPLE_GATHER_OP, self.device, torch.float64)
        if backend in _DRAWS_OFFSETS:
            return launch(self.sum, self.min, self.levels, Draw(seed, counter, batch), beta,
                          plan if backend == "cpu" else plan.sources, weight_dtype)
        return self.sample_gather(draw_offsets(seed, counter, batch), beta, plan.sources, weight_dtype)

    def sample_drawn(self, seed: int, counter: int, batch: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """sample(draw_offsets(seed, counter, batch), beta), the offsets drawn in the kernel where it can."""
        backend, launch = _dispatch.select(SAMPLE_OP, self.device, torch.float64)
        if backend in _DRAWS_OFFSETS:
            return launch(self.sum, self.min, self.levels, Draw(seed, counter, batch), beta)
        return self.sample(draw_offsets(seed, counter, batch), beta)

    def sample(self, offsets: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Stratified: for b < B = len(offsets), the leaf holding mass (b + offsets[b])·total/B, and its importance
        weight (p / p_min)^-β."""
        offsets = as_vector(offsets, torch.float64, self.device)
        _, launch = _dispatch.select(SAMPLE_OP, self.device, torch.float64)
        return launch(self.sum, self.min, self.levels, offsets, beta)
