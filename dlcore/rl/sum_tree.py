"""Sum-tree (and min-tree) for proportional prioritized replay: the ops behind dlcore.rl.PrioritizedReplayBuffer.

Layout: capacity rounded up to a power of two `size`; one float64 array of 2·size, the root at [1], node k's
children at [2k] and [2k+1], leaf i at [size + i]. Unwritten leaves hold 0 (sum tree) and +inf (min tree); so does
a leaf written with 0 (priority 0 with eps 0 and alpha 1): it can never be drawn, so it does not count in p_min.
The frame-stack buffer uses that to take a slot out of sampling.

Three ops behind the dispatch point, each with a numba CPU kernel (`cpu`) and a plain-PyTorch reference; each is one
call from Python, validation included, because the targets are a few microseconds:
  sum_tree_sample(tree, min_tree, offsets, beta) -> (leaf index, importance weight)
      stratified: target mass (b + offsets[b])·total/B for b < B, one descent each; weight (p_i / p_min)^-β
  sum_tree_sample_gather(tree, min_tree, offsets, beta, sources) -> (leaf index, weight, rows of every source)
      the sample and the replay batch's gather in one call: one kernel launch on a GPU (triton, cuda); on the CPU
      the numba descent then the C++ gather_rows
  sum_tree_update(tree, min_tree, index, priority, eps, alpha, limit) -> (status, max of priority + eps)
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

import numpy as np
import torch

from dlcore import _dispatch, _ext

SAMPLE_OP, UPDATE_OP, SAMPLE_GATHER_OP = "sum_tree_sample", "sum_tree_update", "sum_tree_sample_gather"
_dispatch.define_op(SAMPLE_OP, gpu_order=("cuda", "triton"))  # not yet measured on a GPU
_dispatch.define_op(UPDATE_OP, gpu_order=("cuda", "triton"))
_dispatch.define_op(SAMPLE_GATHER_OP, gpu_order=("cuda", "triton"))
BAD_PRIORITY, BAD_INDEX = 1, 2

try:
    import numba

    _numba_error = None
except ImportError as exc:  # reported by `dlcore info`, never faked
    numba = None
    _numba_error = f"numba is not installed: {exc}"


def as_vector(x, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """x as a contiguous 1-D tensor of dtype on device; a tensor that already is one is returned as it is (the
    replay ops are a few microseconds, and each conversion call costs one)."""
    if (type(x) is torch.Tensor and x.dtype == dtype and x.device == device and x.dim() == 1
            and x.is_contiguous()):
        return x
    return torch.as_tensor(x).reshape(-1).to(device, dtype).contiguous()


def tree_size(capacity: int) -> int:
    return 1 << max(0, int(capacity - 1).bit_length())


# ---------------------------------------------------------------------------------------------------- reference
def reference_sample(tree, min_tree, offsets, beta):
    size = tree.numel() // 2
    batch = offsets.numel()
    total = tree[1]
    mass = (torch.arange(batch, dtype=torch.float64) + offsets) * (total / batch)
    mass = torch.minimum(mass, total * (1 - 2 ** -52))  # at or past the total: the last positive leaf
    leaves = tree[size:]
    cumulative = torch.cumsum(leaves, 0)  # (summed in another order than the tree: its total may differ by ulps)
    last_positive = int(torch.nonzero(leaves > 0).max())
    index = torch.searchsorted(cumulative, mass, right=True).clamp_(max=last_positive)  # skips zero leaves
    weight = (tree[size + index] / min_tree[1]).pow(-beta)
    return index, weight


def _check(index, priority, limit) -> int:
    """The update's status code, from tensor ops (one host sync each)."""
    if not bool(((priority >= 0) & (priority < float("inf"))).all()):
        return BAD_PRIORITY
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= limit):
        return BAD_INDEX
    return 0


def reference_update(tree, min_tree, index, priority, eps, alpha, limit):
    status = _check(index, priority, limit)
    if status:
        return status, 0.0
    size = tree.numel() // 2
    value = (priority + eps).pow(alpha)
    for i, v in zip(index.tolist(), value.tolist()):  # in order: the last write of a duplicate wins
        tree[size + i] = v
        min_tree[size + i] = v if v > 0 else float("inf")
    width = size
    while width > 1:  # rebuild level by level from the leaves up
        tree[width // 2:width] = tree[width:2 * width].view(-1, 2).sum(1)
        min_tree[width // 2:width] = min_tree[width:2 * width].view(-1, 2).amin(1)
        width //= 2
    return 0, float((priority + eps).max()) if priority.numel() else 0.0


_dispatch.register(SAMPLE_OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.float64,))(reference_sample)


def _gather_table(sources, n):
    """Outputs [n, ...] for each source and the (src, dst, row_bytes) table the fused GPU kernels read."""
    from dlcore.rl.gather import _outputs, _row_bytes

    outs = _outputs(sources, n)
    table = torch.tensor([[s.data_ptr(), o.data_ptr(), _row_bytes(s)] for s, o in zip(sources, outs)],
                         dtype=torch.int64)
    return outs, table


@_dispatch.register(SAMPLE_GATHER_OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.float64,))
def reference_sample_gather(tree, min_tree, offsets, beta, sources):
    index, weight = reference_sample(tree, min_tree, offsets, beta)
    return index, weight, [s.index_select(0, index.to(s.device)) for s in sources]
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
    def launch(tree, min_tree, index, priority, eps, alpha, limit):
        index, priority = index.to(tree.device), priority.to(tree.device)
        status = _check(index, priority, limit)
        if status:
            return status, 0.0
        if index.numel() == 0:
            return 0, 0.0
        kernel_update(tree, min_tree, *_resolve_duplicates(index, priority, eps, alpha))
        return 0, float((priority + eps).max())

    return launch


# ---------------------------------------------------------------------------------------------------- cuda


def _cuda_update_kernel(tree, min_tree, index, value):
    with torch.cuda.device(tree.device):
        _ext.cuda.sum_tree_update(tree.data_ptr(), min_tree.data_ptr(), index.data_ptr(), value.data_ptr(),
                                  index.numel(), tree.numel() // 2, _ext.cuda_stream(tree.device))


@_dispatch.register(SAMPLE_OP, "cuda", devices=("cuda",), dtypes=(torch.float64,), available=_ext.cuda_unavailable)
def cuda_sample(tree, min_tree, offsets, beta):
    offsets = offsets.to(tree.device).contiguous()
    index = torch.empty(offsets.numel(), dtype=torch.int64, device=tree.device)
    weight = torch.empty(offsets.numel(), dtype=torch.float64, device=tree.device)
    with torch.cuda.device(tree.device):
        _ext.cuda.sum_tree_sample(tree.data_ptr(), min_tree.data_ptr(), offsets.data_ptr(), index.data_ptr(),
                                  weight.data_ptr(), offsets.numel(), tree.numel() // 2, float(beta),
                                  _ext.cuda_stream(tree.device))
    return index, weight


_dispatch.register(UPDATE_OP, "cuda", devices=("cuda",), dtypes=(torch.float64,),
                   available=_ext.cuda_unavailable)(_parallel_update(_cuda_update_kernel))


@_dispatch.register(SAMPLE_GATHER_OP, "cuda", devices=("cuda",), dtypes=(torch.float64,),
                    available=_ext.cuda_unavailable)
def cuda_sample_gather(tree, min_tree, offsets, beta, sources):
    offsets = offsets.to(tree.device).contiguous()
    batch = offsets.numel()
    index = torch.empty(batch, dtype=torch.int64, device=tree.device)
    weight = torch.empty(batch, dtype=torch.float64, device=tree.device)
    outs, table = _gather_table(sources, batch)
    table = table.to(tree.device)
    with torch.cuda.device(tree.device):
        _ext.cuda.sum_tree_sample_gather(tree.data_ptr(), min_tree.data_ptr(), offsets.data_ptr(), index.data_ptr(),
                                         weight.data_ptr(), table.data_ptr(), table.shape[0], batch,
                                         tree.numel() // 2, float(beta), _ext.cuda_stream(tree.device))
    return index, weight, outs


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(SAMPLE_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.float64,),
                    available=_ext.triton_unavailable("sum_tree"))
def triton_sample(tree, min_tree, offsets, beta):
    from dlcore.kernels import sum_tree as kernel

    return kernel.sample(tree, min_tree, offsets.to(tree.device), beta)


@_dispatch.register(SAMPLE_GATHER_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.float64,),
                    available=_ext.triton_unavailable("sum_tree"))
def triton_sample_gather(tree, min_tree, offsets, beta, sources):
    from dlcore.kernels import sum_tree as kernel

    outs, table = _gather_table(sources, offsets.numel())
    index, weight = kernel.sample_gather(tree, min_tree, offsets.to(tree.device), beta, table.to(tree.device))
    return index, weight, outs


def _triton_update_kernel(tree, min_tree, index, value):
    from dlcore.kernels import sum_tree as kernel

    kernel.update(tree, min_tree, index, value)


_dispatch.register(UPDATE_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.float64,),
                   available=_ext.triton_unavailable("sum_tree"))(_parallel_update(_triton_update_kernel))


# ---------------------------------------------------------------------------------------------------- numba (CPU)
if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _sample_kernel(tree, min_tree, offsets, beta, out_index, out_weight):
        size = tree.shape[0] // 2
        batch = offsets.shape[0]
        total = tree[1]
        node = np.ones(batch, dtype=np.int64)
        mass = np.empty(batch, dtype=np.float64)
        for b in range(batch):
            mass[b] = min((b + offsets[b]) * (total / batch), total * (1.0 - 2.0 ** -52))
        width = 1
        while width < size:  # one level of every descent per pass
            for b in range(batch):
                left = 2 * node[b]
                left_sum, m = tree[left], mass[b]
                # Go right when the mass lies past the left sum and the right subtree is not empty (float rounding
                # can leave a mass just past the left sum): an unwritten (zero) leaf is never returned. Written
                # without a branch (LLVM emits selects): the direction is a coin flip the CPU cannot predict, and
                # mispredictions cost more than the cache misses (32 → 17 µs for 256 descents in 2^20 leaves).
                right = (m >= left_sum) & (tree[left + 1] > 0.0)
                node[b] = left + np.int64(right)
                mass[b] = m - (left_sum if right else 0.0)
            width *= 2
        inv_min = 1.0 / min_tree[1]
        for b in range(batch):
            out_index[b] = node[b] - size
            out_weight[b] = (tree[node[b]] * inv_min) ** (-beta)

    @numba.njit(cache=True, nogil=True)
    def _update_kernel(tree, min_tree, index, priority, eps, alpha, limit):
        size = tree.shape[0] // 2
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
        for k in range(n):
            v = (priority[k] + eps) ** alpha
            tree[size + index[k]] = v
            min_tree[size + index[k]] = v if v > 0.0 else np.inf
            node[k] = (size + index[k]) // 2
        width = size // 2  # nodes [width, 2·width) form the level being recomputed
        while width > n:  # every touched ancestor, one level per pass
            for k in range(n):
                j = node[k]
                tree[j] = tree[2 * j] + tree[2 * j + 1]
                min_tree[j] = min(min_tree[2 * j], min_tree[2 * j + 1])
                node[k] = j // 2
            width //= 2
        while width >= 1:  # levels no wider than the batch: all of it, in order (same sums, fewer, no scatter)
            for j in range(width, 2 * width):
                tree[j] = tree[2 * j] + tree[2 * j + 1]
                min_tree[j] = min(min_tree[2 * j], min_tree[2 * j + 1])
            width //= 2
        return 0, top


def _numba_available():
    return _numba_error


@_dispatch.register(SAMPLE_OP, "cpu", devices=("cpu",), dtypes=(torch.float64,), available=_numba_available)
def cpu_sample(tree, min_tree, offsets, beta):
    index = np.empty(offsets.numel(), dtype=np.int64)
    weight = np.empty(offsets.numel(), dtype=np.float64)
    _sample_kernel(tree.numpy(), min_tree.numpy(), offsets.numpy(), float(beta), index, weight)
    return torch.from_numpy(index), torch.from_numpy(weight)


@_dispatch.register(SAMPLE_GATHER_OP, "cpu", devices=("cpu",), dtypes=(torch.float64,), available=_numba_available)
def cpu_sample_gather(tree, min_tree, offsets, beta, sources):
    from dlcore.rl.gather import cpu_gather_rows

    index, weight = cpu_sample(tree, min_tree, offsets, beta)
    return index, weight, cpu_gather_rows(sources, index, min(s.shape[0] for s in sources))


@_dispatch.register(UPDATE_OP, "cpu", devices=("cpu",), dtypes=(torch.float64,), available=_numba_available)
def cpu_update(tree, min_tree, index, priority, eps, alpha, limit):
    return _update_kernel(tree.numpy(), min_tree.numpy(), index.numpy(), priority.numpy(), float(eps), float(alpha),
                          int(limit))


# ---------------------------------------------------------------------------------------------------- the tree
class SumTree:
    """Sum and min trees over `capacity` leaves (float64) on `device`: the numba kernels on the CPU, the Triton
    kernels on a GPU (dispatch as for every op)."""

    def __init__(self, capacity: int, device: "str | torch.device" = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.size = tree_size(self.capacity)
        self.device = torch.device(device)
        self.sum = torch.zeros(2 * self.size, dtype=torch.float64, device=self.device)
        self.min = torch.full((2 * self.size,), float("inf"), dtype=torch.float64, device=self.device)

    @property
    def total(self) -> float:
        return float(self.sum[1])

    @property
    def min_leaf(self) -> float:
        return float(self.min[1])

    def leaves(self, index: torch.Tensor) -> torch.Tensor:
        return self.sum[self.size + index]

    def update(self, index, priority, eps: float = 0.0, alpha: float = 1.0, limit: int | None = None) -> float:
        """Leaves `index` ← (priority + eps)^alpha. Raises on a negative or non-finite priority or an index outside
        [0, limit) (default: capacity), before writing anything. Returns max(priority + eps)."""
        index = as_vector(index, torch.int64, self.device)
        priority = as_vector(priority, torch.float64, self.device)
        if index.numel() != priority.numel():
            raise ValueError(f"index has {index.numel()} entries but priority has {priority.numel()}")
        limit = self.capacity if limit is None else int(limit)
        _, launch = _dispatch.select(UPDATE_OP, self.device, torch.float64)
        status, top = launch(self.sum, self.min, index, priority, eps, alpha, limit)
        if status == BAD_PRIORITY:
            raise ValueError("priorities must be finite and non-negative (pass |TD error|)")
        if status == BAD_INDEX:
            raise IndexError(f"index out of range [0, {limit}): min {int(index.min())}, max {int(index.max())}")
        return top

    def sample_gather(self, offsets: torch.Tensor, beta: float, sources: list[torch.Tensor]):
        """sample(), plus rows `index` of every tensor in `sources` (contiguous, on the tree's device, at least as
        many rows as the leaves that can be drawn): (index, weight, [rows of each source])."""
        offsets = as_vector(offsets, torch.float64, self.device)
        _, launch = _dispatch.select(SAMPLE_GATHER_OP, self.device, torch.float64)
        return launch(self.sum, self.min, offsets, beta, sources)

    def sample(self, offsets: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Stratified: for b < B = len(offsets), the leaf holding mass (b + offsets[b])·total/B, and its importance
        weight (p / p_min)^-β."""
        offsets = as_vector(offsets, torch.float64, self.device)
        _, launch = _dispatch.select(SAMPLE_OP, self.device, torch.float64)
        return launch(self.sum, self.min, offsets, beta)
