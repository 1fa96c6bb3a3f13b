"""Replay buffers over a dict of named fields: uniform (`ReplayBuffer`) and proportional prioritized
(`PrioritizedReplayBuffer`, Schaul et al. 2015: p = |δ| + ε, P(i) = p_iᵅ / Σ pᵅ, importance weights
(N·P(i))^-β normalised by their max, β annealed towards 1).

Storage is a circular array per field, allocated from the first transition added (or from `fields=`). Adds,
samples and priority updates take a lock, so an actor thread may add while a learner thread samples. Sampling is
seeded by the buffer's own generator (`seed=`, else drawn from torch's global generator, so torch.manual_seed makes
runs reproducible): uniform draws come from it, prioritized ones are the Philox numbers of (its seed, the number of
samples drawn so far), computed inside the sampling kernel on every backend. `state_dict()` / `load_state_dict()`
and `save()` / `load()` round-trip everything exactly, generator state included.
"""
from __future__ import annotations

import threading
from typing import Mapping, Optional, Union

import torch

from dlcore import _dispatch
from dlcore.rl import _memory
from dlcore.rl import gather as _gather_op
from dlcore.rl.sum_tree import GatherPlan, SumTree

FieldSpec = Mapping[str, tuple]  # name -> (shape, dtype)


class ReplayBuffer:
    """Uniform replay over named fields.

    Args:
        capacity: transitions kept; the oldest is overwritten first.
        fields: optional {name: (shape, dtype)}; otherwise taken from the first `add` / `extend`.
        device: where the storage lives (sampled batches are returned there).
        seed: seed of the buffer's sampling generator.
    """

    def __init__(self, capacity: int, fields: Optional[FieldSpec] = None, device: Union[str, torch.device] = "cpu",
                 seed: Optional[int] = None):
        if int(capacity) < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.device = torch.device(device)
        try:  # storage is allocated at the first add: say now, not then, that this device cannot hold it
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as err:  # (torch without CUDA raises an AssertionError)
            raise ValueError(f"device={str(device)!r} cannot hold tensors in this process: {err}") from err
        self._storage: dict[str, torch.Tensor] = {}
        self._pos = 0
        self._size = 0
        self._lock = threading.RLock()
        self._plan: Optional[GatherPlan] = None  # the storage's addresses for the CPU gather, made at first use
        self._gen = torch.Generator()
        self._gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed))
        if fields is not None:
            self._allocate({k: (tuple(shape), dtype) for k, (shape, dtype) in fields.items()})

    # ------------------------------------------------------------------------------------------------ storage
    def _allocate(self, spec: dict[str, tuple]) -> None:
        if not spec:
            raise ValueError("a transition needs at least one field")
        self._storage = {name: _memory.rows((self.capacity, *shape), dtype, self.device)
                         for name, (shape, dtype) in spec.items()}
        self._plan = None

    def _gather_plan(self) -> GatherPlan:
        if self._plan is None:
            self._plan = GatherPlan(self._storage.values())
        return self._plan

    @property
    def fields(self) -> dict[str, tuple]:
        return {k: (tuple(v.shape[1:]), v.dtype) for k, v in self._storage.items()}

    def __len__(self) -> int:
        return self._size

    _lists_fields = True  # repr shows the stored fields (the frame-stack buffers show their frame layout instead)

    def _repr_settings(self) -> list[str]:
        """`name=value` items of the repr; subclasses add theirs through super()."""
        items = [f"capacity={self.capacity}", f"size={self._size}", f"device={self.device}"]
        if self._lists_fields:
            fields = ", ".join(f"{name}: {tuple(shape)} {str(dtype).removeprefix('torch.')}"
                               for name, (shape, dtype) in self.fields.items())
            items.append(f"fields={{{fields}}}")
        return items

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self._repr_settings())})"

    def _as_batch(self, data: Mapping[str, object], batched: bool) -> tuple[dict[str, torch.Tensor], int]:
        if not self._storage:
            spec = {}
            for name, value in data.items():
                t = torch.as_tensor(value)
                spec[name] = (tuple(t.shape[1:] if batched else t.shape), t.dtype)
            self._allocate(spec)
        if set(data) != set(self._storage):
            raise KeyError(f"transition fields {sorted(data)} differ from the buffer's {sorted(self._storage)}")
        out, n = {}, None
        for name, value in data.items():
            store = self._storage[name]
            t = torch.as_tensor(value, device=self.device)
            if not batched:
                t = t.unsqueeze(0)
            if tuple(t.shape[1:]) != tuple(store.shape[1:]):
                raise ValueError(f"field {name!r} has shape {tuple(t.shape[1:])} per transition, the buffer holds "
                                 f"{tuple(store.shape[1:])}")
            if t.dtype != store.dtype and not (t.dtype.is_floating_point == store.dtype.is_floating_point
                                               and torch.can_cast(t.dtype, store.dtype)):
                raise TypeError(f"field {name!r} is {t.dtype}; the buffer stores {store.dtype}")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise ValueError(f"field {name!r} has {t.shape[0]} transitions, others have {n}")
            out[name] = t
        return out, int(n)

    def _write(self, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        if n > self.capacity:  # only the newest `capacity` survive
            batch = {k: v[-self.capacity:] for k, v in batch.items()}
            self._pos = (self._pos + n - self.capacity) % self.capacity
            n = self.capacity
        index = (self._pos + torch.arange(n)) % self.capacity
        for name, value in batch.items():
            self._storage[name].index_copy_(0, index.to(self.device), value.to(self._storage[name].dtype))
        self._pos = (self._pos + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        return index

    def add(self, **transition) -> torch.Tensor:
        """Store one transition (each field without a batch dimension); returns its slot."""
        with self._lock:
            batch, n = self._as_batch(transition, batched=False)
            return self._write(batch, n)

    def extend(self, **transitions) -> torch.Tensor:
        """Store a batch (each field with the same leading batch dimension); returns the slots written."""
        with self._lock:
            batch, n = self._as_batch(transitions, batched=True)
            return self._write(batch, n) if n else torch.empty(0, dtype=torch.int64)

    # ------------------------------------------------------------------------------------------------ sampling
    def _check_batch_size(self, batch_size: int) -> None:
        if self._size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        if not 1 <= batch_size <= self._size:
            raise ValueError(f"batch_size must be in [1, {self._size}] (transitions stored), got {batch_size}")

    def _gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        # every field in one call of the gather_rows op (the storage is ours: contiguous, one device)
        idx = index if index.device == self.device else index.to(self.device)
        _, launch = _dispatch.select(_gather_op.OP, self.device)
        out = dict(zip(self._storage, launch(list(self._storage.values()), idx, self._size)))
        out["index"] = index
        return out

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """`batch_size` transitions drawn uniformly with replacement; the dict also holds their "index"."""
        with self._lock:
            self._check_batch_size(batch_size)
            index = torch.randint(0, self._size, (batch_size,), generator=self._gen)
            return self._gather(index)

    # ------------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        with self._lock:
            return {"capacity": self.capacity, "pos": self._pos, "size": self._size,
                    "storage": {k: v.clone() for k, v in self._storage.items()},
                    "generator": self._gen.get_state()}

    def _require(self, state: Mapping, keys: tuple) -> None:
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"state lacks {missing}: a {type(self).__name__} loads the state_dict() of its own kind "
                             "(a buffer without priorities saves no sum-tree; one without frames no episodes)")

    def _check_state(self, state: Mapping) -> None:
        """Raise ValueError, before anything is replaced, unless `state` is a state_dict() this buffer can load
        (each subclass checks its own part after its parent's)."""
        self._require(state, ("capacity", "pos", "size", "storage", "generator"))
        if state["capacity"] != self.capacity:
            raise ValueError(f"state has capacity {state['capacity']}, this buffer {self.capacity}")

    def load_state_dict(self, state: dict) -> None:
        """Replace everything stored (and the sampling generator's state) by a `state_dict()`'s copy."""
        with self._lock:
            self._check_state(state)
            self._storage = {k: _memory.rows(tuple(v.shape), v.dtype, self.device).copy_(v)
                             for k, v in state["storage"].items()}
            self._plan = None
            self._pos, self._size = int(state["pos"]), int(state["size"])
            self._gen.set_state(state["generator"])

    def save(self, path) -> None:
        """torch.save of `state_dict()` (storage, positions, generator state) to `path`; `load(path)` restores it."""
        torch.save(self.state_dict(), path)

    def __getstate__(self) -> dict:
        """copy.deepcopy, pickle and torch.save of the buffer itself: everything but the lock (a fresh one after).
        The tensors are copied after this returns, so copy a buffer while no other thread adds to it."""
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plan"] = None  # raw addresses of this buffer's storage, not of the copy's
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._plan = None  # (also absent from buffers pickled before it existed)

    def load(self, path) -> None:
        """Restore, into this buffer (same kind and capacity), what `save(path)` wrote."""
        self.load_state_dict(torch.load(path, weights_only=False))


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay on a sum-tree.

    Args (beyond ReplayBuffer's):
        alpha: priority exponent (0 = uniform), default 0.6.
        beta: importance-sampling exponent at the start, default 0.4.
        beta_final, beta_steps: β rises linearly to beta_final over beta_steps calls of `sample` (None: constant).
        eps: added to |δ| in `update_priorities` so no transition starves.
    New transitions get the largest priority seen so far. `sample` returns "index" and "weight" with the fields.
    Sample k's stratum offsets are Philox numbers of (the buffer's seed, k) (`sum_tree.draw_offsets`): the same
    draws on every backend and device, and no generator call per sample.
    """

    _gathers_fields = True  # a sample is the stored fields' rows (the frame-stack buffers assemble theirs instead)

    def __init__(self, capacity: int, fields: Optional[FieldSpec] = None, device: Union[str, torch.device] = "cpu",
                 seed: Optional[int] = None, alpha: float = 0.6, beta: float = 0.4, beta_final: float = 1.0,
                 beta_steps: Optional[int] = None, eps: float = 1e-6):
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if not 0 <= beta <= 1 or not 0 <= beta_final <= 1:
            raise ValueError(f"beta and beta_final must be in [0, 1], got {beta}, {beta_final}")
        super().__init__(capacity, fields, device, seed)
        self.alpha, self.beta0, self.beta_final, self.beta_steps, self.eps = alpha, beta, beta_final, beta_steps, eps
        self._tree = SumTree(self.capacity, self.device)
        self._max_priority = 1.0
        self._samples_drawn = 0  # also the Philox counter of the next draw's offsets
        self._draw_seed = self._gen.initial_seed() % 2**63  # (the Philox key: an int64 in every backend)

    def _repr_settings(self) -> list[str]:
        beta = f"beta={self.beta0}" if not self.beta_steps else \
            f"beta={self.beta:g} ({self.beta0} → {self.beta_final} over {self.beta_steps} samples)"
        return super()._repr_settings() + [f"alpha={self.alpha}", beta, f"eps={self.eps}"]

    @property
    def beta(self) -> float:
        if not self.beta_steps:
            return self.beta0
        frac = min(1.0, self._samples_drawn / self.beta_steps)
        return self.beta0 + frac * (self.beta_final - self.beta0)

    def _write(self, batch, n):
        index = super()._write(batch, n)
        self._tree.update(index, torch.full((index.numel(),), self._max_priority, dtype=torch.float64),
                          alpha=self.alpha)
        return index

    def sample(self, batch_size: int, beta: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Stratified proportional sampling: the total priority mass is cut into `batch_size` equal segments and
        one transition is drawn in each. Returns the fields, "index" and the normalised importance "weight"."""
        with self._lock:
            self._check_batch_size(batch_size)
            beta = self.beta if beta is None else float(beta)
            if not 0 <= beta <= 1:
                raise ValueError(f"beta must be in [0, 1], got {beta}")
            draw = self._draw_seed, self._samples_drawn
            # w_i = (N·P(i))^-β / max_j (N·P(j))^-β = (p_i / p_min)^-β: the max weight belongs to the min priority
            if self._gathers_fields:  # the draw and the gather of every field in one call (one launch on a GPU)
                index, weight, rows = self._tree.sample_gather_drawn(*draw, batch_size, beta, self._gather_plan(),
                                                                     weight_dtype=torch.float32)
                out = dict(zip(self._storage, rows))
                out["index"] = index
            else:
                index, weight = self._tree.sample_drawn(*draw, batch_size, beta)
                out = self._gather(index)
                weight = weight.to(self.device, torch.float32)
            self._samples_drawn += 1
            out["weight"] = weight
            return out

    def update_priorities(self, index, priority) -> None:
        """Set p = priority + eps for the transitions at `index`; priority is non-negative and finite (pass |TD
        error|: a negative one is a ValueError, not silently folded); the last of duplicates wins."""
        with self._lock:
            # one call (SumTree.update converts index and priority once): validation (finite, non-negative, index < transitions stored), leaves, ancestors
            top = self._tree.update(index, priority, eps=self.eps, alpha=self.alpha, limit=self._size)
            self._max_priority = max(self._max_priority, top)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_draw_seed" not in state:  # pickled before the Philox draws
            self._draw_seed = self._gen.initial_seed() % 2**63

    def state_dict(self) -> dict:
        with self._lock:
            state = super().state_dict()
            state.update(tree_sum=self._tree.sum.clone(), tree_min=self._tree.min.clone(),
                         max_priority=self._max_priority, samples_drawn=self._samples_drawn,
                         draw_seed=self._draw_seed)
            return state

    def _check_state(self, state: Mapping) -> None:
        super()._check_state(state)
        self._require(state, ("tree_sum", "tree_min", "max_priority", "samples_drawn"))
        self._tree.check_saved(state["tree_sum"], state["tree_min"])

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            super().load_state_dict(state)  # (checks the whole state first)
            self._tree.load_trees(state["tree_sum"], state["tree_min"])
            self._max_priority = float(state["max_priority"])
            self._samples_drawn = int(state["samples_drawn"])
            self._draw_seed = int(state.get("draw_seed", self._gen.initial_seed() % 2**63))  # (states saved before it)
