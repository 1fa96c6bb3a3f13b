"""Replay for stacked-frame observations (Atari) that keeps each frame once: `FrameStackReplayBuffer` (uniform) and
`PrioritizedFrameStackReplayBuffer` (proportional, on the sum-tree).

A DQN on Atari sees the last `stack` frames (4×84×84). Storing obs and next_obs of every transition keeps each frame
eight times (56 GB for 1M transitions); here a slot holds one frame, and stacks are assembled when sampled (1M
transitions of 84×84 uint8 frames: about 7 GB).

Slots, one per environment step, in stream order:
    frame[t]       newest frame of obs_t            action[t], reward[t], terminated[t]
    ended[t]       the episode ended at this step (terminated or truncated)
    episode_start[t]  slot of the episode's first frame
When an episode ends, one more slot holds the newest frame of its last next_obs (it is never drawn itself), so a
time-limit truncation still bootstraps from the true next observation.

Sampling slot t, with m = min(n_step, steps from t to the episode's end):
    obs       frames t-stack+1 .. t; those before the episode's first frame are padding: "reset" repeats the first
              frame (as gymnasium's FrameStackObservation pads), "zero" is zeros
    reward    Σ_{k<m} γᵏ r[t+k]          next_obs   the stack at slot t+m
    terminated  terminated[t+m-1]       discount   γᵐ  (the factor in front of max Q(next_obs) in the target)
A slot can be drawn once its n-step window is written (the n slots after it, or its episode's end), and until the
ring overwrites a frame its stacks read. One stream of steps per buffer (vectorised environments: one buffer each).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from dlcore import _dispatch, _ext
from dlcore.rl import gather as _gather_op
from dlcore.rl.buffers import PrioritizedReplayBuffer, ReplayBuffer
from dlcore.rl.sum_tree import as_vector

PADDINGS = ("reset", "zero")

# ---------------------------------------------------------------------------------------------------- the op
# frame_stack_sample(index, frames, ended, reward, terminated, episode_start, stack, n_step, gamma, zero_pad)
#     -> stacks [2, B, stack, *frame] (obs, next_obs), reward, terminated, discount (fp32 [B])
# Backends: `reference` (torch ops: the plan below, index_select), `cpu` (plan and frame copies in one C++ call,
# csrc/cpu/gather.cpp: ~20 small tensor ops, or a numba call with 13 arrays, cost more than the plan of 32 samples),
# `triton` (one kernel: plan and frame copies, kernels/frames.py).
SAMPLE_OP = "frame_stack_sample"
_dispatch.define_op(SAMPLE_OP, gpu_order=("triton",))


def reference_plan(index, ended, reward, terminated, episode_start, stack, n_step, gamma):
    """frames [2, B, stack] (the slots of the obs and next_obs stacks' frames), pad [2, B, stack], reward,
    terminated, discount: everything a sample needs but the frames themselves."""
    cap, device = ended.numel(), index.device
    k = torch.arange(n_step, device=device)
    window = (index.unsqueeze(1) + k) % cap                      # [B, n] the steps of each n-step return
    end = ended[window].long()
    inside = (end.cumsum(1) - end) == 0                          # up to and including the first end
    m = inside.sum(1)
    ret = (reward[window].double() * (gamma ** k.double()) * inside).sum(1)
    slots = torch.stack([index, (index + m) % cap])              # stacks end at t (obs) and t+m (next_obs)
    since_start = (slots - episode_start[slots]) % cap
    back = torch.arange(stack - 1, -1, -1, device=device)
    pad = back > since_start.unsqueeze(-1)
    # padding reads the episode's first frame ("reset"; "zero" clears it after the gather)
    frames = (slots.unsqueeze(-1) - torch.minimum(back, since_start.unsqueeze(-1))) % cap
    return (frames, pad, ret.float(), terminated[(index + m - 1) % cap].float(),
            (gamma ** m.double()).float())


def _stacks(frames, slots, pad, zero_pad, gathered):
    stacks = gathered.view(*slots.shape, *frames.shape[1:])
    if zero_pad and bool(pad.any()):
        stacks[pad] = 0
    return stacks


@_dispatch.register(SAMPLE_OP, "reference", devices=("cpu", "cuda"), dtypes=(torch.int64,))
def reference_sample(index, frames, ended, reward, terminated, episode_start, stack, n_step, gamma, zero_pad):
    slots, pad, ret, term, discount = reference_plan(index, ended, reward, terminated, episode_start, stack,
                                                     n_step, gamma)
    return _stacks(frames, slots, pad, zero_pad, frames.index_select(0, slots.reshape(-1))), ret, term, discount


@_dispatch.register(SAMPLE_OP, "cpu", devices=("cpu",), dtypes=(torch.int64,), available=_ext.cpu_unavailable)
def cpu_sample(index, frames, ended, reward, terminated, episode_start, stack, n_step, gamma, zero_pad):
    index = index.contiguous()
    batch = index.numel()
    stacks = frames.new_empty((2, batch, stack, *frames.shape[1:]))
    scalars = torch.empty((3, batch), dtype=torch.float32)  # ret, terminated, discount: rows of one allocation
    row = scalars.data_ptr()
    status = _ext.cpu.frame_stack_sample(
        frames.data_ptr(), math.prod(frames.shape[1:]) * frames.element_size(), ended.data_ptr(), reward.data_ptr(),
        terminated.data_ptr(), episode_start.data_ptr(), ended.numel(), index.data_ptr(), batch, stack, n_step,
        float(gamma), bool(zero_pad), stacks.data_ptr(), row, row + 4 * batch, row + 8 * batch)
    if status:
        raise _gather_op._index_error(index, ended.numel())
    return (stacks, *scalars.unbind())


@_dispatch.register(SAMPLE_OP, "triton", devices=("cpu", "cuda"), dtypes=(torch.int64,),
                    available=_ext.triton_unavailable("frames"))
def triton_sample(index, frames, ended, reward, terminated, episode_start, stack, n_step, gamma, zero_pad):
    from dlcore.kernels import frames as kernel

    return kernel.sample(index, frames, ended, reward, terminated, episode_start, stack, n_step, gamma, zero_pad)


class FrameStackReplayBuffer(ReplayBuffer):
    """Uniform replay over stacked frames, each frame stored once (see the module docstring).

    Args:
        capacity: slots (one per environment step, plus one per finished episode).
        frame_shape: shape of one frame, e.g. (84, 84).
        stack: frames per observation.
        n_step: steps per return; `sample` returns the n-step reward, "discount" = γᵐ and the stack m steps on.
        gamma: discount factor of the n-step return.
        padding: "reset" (repeat the episode's first frame) or "zero", for stacks reaching before an episode.
        frame_dtype: dtype of the stored frames (uint8 for Atari).
        device, seed: as for ReplayBuffer.

    `add(obs, action, reward, next_obs, terminated, truncated)` takes one step (obs/next_obs either stacks
    [stack, *frame_shape] whose newest frame is last, or single frames); `sample(batch_size)` returns obs, action,
    reward, next_obs, terminated (float32), discount, index.
    """

    _lists_fields = False  # its fields are per-slot bookkeeping: the repr shows the frame layout

    def __init__(self, capacity: int, frame_shape=(84, 84), stack: int = 4, n_step: int = 1, gamma: float = 0.99,
                 padding: str = "reset", frame_dtype: torch.dtype = torch.uint8,
                 device: Union[str, torch.device] = "cpu", seed: Optional[int] = None, **prioritized):
        if int(stack) < 1:
            raise ValueError(f"stack must be at least 1, got {stack}")
        if int(n_step) < 1:
            raise ValueError(f"n_step must be at least 1, got {n_step}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if int(capacity) < 2 * (stack + n_step) + 2:
            raise ValueError(f"capacity must be at least 2·(stack + n_step) + 2 = {2 * (stack + n_step) + 2}, "
                             f"got {capacity}")
        self.frame_shape, self.stack, self.n_step = tuple(int(d) for d in frame_shape), int(stack), int(n_step)
        self.gamma, self.padding = float(gamma), padding
        fields = {"frame": (self.frame_shape, frame_dtype), "action": ((), torch.int64),
                  "reward": ((), torch.float32), "terminated": ((), torch.bool), "ended": ((), torch.bool),
                  "episode_start": ((), torch.int64), "sampleable": ((), torch.bool)}
        super().__init__(capacity, fields, device, seed, **prioritized)
        self._views: Optional[dict] = None   # per-slot fields as numpy views (CPU) or the tensors (GPU)
        self._episode: Optional[int] = None  # slot of the open episode's first frame; None between episodes
        self._steps = 0                      # transitions of the open episode written so far
        self._count = 0                      # slots that can be drawn

    def __len__(self) -> int:
        """Slots that can be drawn now."""
        return self._count

    # ------------------------------------------------------------------------------------------------ writing
    def _newest_frame(self, x, name: str) -> torch.Tensor:
        t = torch.as_tensor(x, device=self.device)
        if tuple(t.shape) == (self.stack, *self.frame_shape):
            t = t[-1]
        elif tuple(t.shape) != self.frame_shape:
            raise ValueError(f"{name} must have shape {(self.stack, *self.frame_shape)} (a stack, newest frame "
                             f"last) or {self.frame_shape} (one frame), got {tuple(t.shape)}")
        dtype = self._storage["frame"].dtype
        if t.dtype != dtype:
            raise TypeError(f"{name} is {t.dtype}; the buffer stores {dtype} frames")
        return t

    @property
    def _slot_fields(self) -> dict:
        """The per-slot fields for single-element writes: numpy views of CPU storage (a numpy item write costs
        ~0.1 µs, a tensor one several), the tensors themselves on a GPU."""
        if self._views is None:
            self._views = {k: (v.numpy() if v.device.type == "cpu" else v) for k, v in self._storage.items()
                           if k != "frame"}
        return self._views

    def _set_sampleable(self, slots: list[int], flag: bool) -> None:
        sampleable = self._slot_fields["sampleable"]
        for s in slots:
            self._count += int(flag) - int(bool(sampleable[s]))
            sampleable[s] = flag

    def _write_slot(self, frame, action, reward, terminated: bool, ended: bool) -> int:
        slot, fields = self._pos, self._slot_fields
        if self._size == self.capacity:  # the ring takes the oldest slot: nothing may read its frame any more
            lost = [slot]
            for k in range(1, self.stack):  # the next slots' stacks reach back into it, unless they start an episode
                s = (slot + k) % self.capacity
                if int(fields["episode_start"][s]) == s:
                    break
                lost.append(s)
            self._set_sampleable([s for s in lost if bool(fields["sampleable"][s])], False)
        self._storage["frame"][slot].copy_(frame)
        for name, value in (("action", int(action)), ("reward", float(reward)), ("terminated", bool(terminated)),
                            ("ended", bool(ended)), ("episode_start", self._episode), ("sampleable", False)):
            fields[name][slot] = value
        self._pos = (slot + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)
        return slot

    def add(self, obs, action, reward, next_obs, terminated, truncated=False) -> int:
        """Store one environment step; returns its slot. `next_obs` is read only when the episode ends here."""
        with self._lock:
            frame = self._newest_frame(obs, "obs")
            ended = bool(terminated) or bool(truncated)
            end_frame = self._newest_frame(next_obs, "next_obs") if ended else None
            if self._episode is None:
                self._episode, self._steps = self._pos, 0
            if self._steps + self.stack + self.n_step + 2 >= self.capacity:
                raise ValueError(f"an episode of {self._steps + 1} steps does not fit in a buffer of capacity "
                                 f"{self.capacity}; use a larger capacity")
            slot = self._write_slot(frame, action, reward, bool(terminated), ended)
            self._steps += 1
            if self._steps > self.n_step:  # its n-step window is complete: the step n before it can be drawn
                self._set_sampleable([(slot - self.n_step) % self.capacity], True)
            if ended:
                end = self._write_slot(end_frame, 0, 0.0, False, True)
                last = min(self.n_step, self._steps)  # the windows that reach the episode's end
                self._set_sampleable([(end - k) % self.capacity for k in range(1, last + 1)], True)
                self._episode = None
            return slot

    def extend(self, **transitions):
        raise TypeError(f"{type(self).__name__} stores one step at a time, in stream order: use add(obs, action, "
                        "reward, next_obs, terminated, truncated)")

    # ------------------------------------------------------------------------------------------------ sampling
    def _check_batch_size(self, batch_size: int) -> None:
        if self._count == 0:
            raise RuntimeError("no transition can be sampled yet (each needs its n-step window written)")
        if not 1 <= batch_size <= self._count:
            raise ValueError(f"batch_size must be in [1, {self._count}] (transitions that can be drawn), "
                             f"got {batch_size}")

    def _gather(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self._storage
        idx = as_vector(index, torch.int64, self.device)
        _, launch = _dispatch.select(SAMPLE_OP, self.device, torch.int64)
        stacks, reward, terminated, discount = launch(idx, st["frame"], st["ended"], st["reward"], st["terminated"],
                                                      st["episode_start"], self.stack, self.n_step, self.gamma,
                                                      self.padding == "zero")
        return {"obs": stacks[0], "action": st["action"][idx], "reward": reward,
                "next_obs": stacks[1], "terminated": terminated, "discount": discount, "index": index}

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """`batch_size` slots drawn uniformly (with replacement) among those that can be drawn."""
        with self._lock:
            self._check_batch_size(batch_size)
            ok = self._storage["sampleable"][:self._size]
            if 2 * self._count >= self._size:  # mostly drawable: draw, keep the drawable, draw again for the rest
                # on the CPU the check reads the numpy view: two numpy calls cost ~1 µs, the tensor ones ~5
                flags = self._slot_fields["sampleable"] if self.device.type == "cpu" else None
                index = None
                while index is None or index.numel() < batch_size:
                    draw = torch.randint(0, self._size, (batch_size,), generator=self._gen)
                    keep = flags[draw.numpy()] if flags is not None else ok[draw.to(self.device)].cpu()
                    # usually all are drawable: skip the masked copy
                    kept = draw if bool(keep.all()) else draw[torch.as_tensor(keep)]
                    index = kept if index is None else torch.cat([index, kept])
                if index.numel() > batch_size:
                    index = index[:batch_size]
            else:
                choices = torch.nonzero(ok).squeeze(1).cpu()
                index = choices[torch.randint(0, choices.numel(), (batch_size,), generator=self._gen)]
            return self._gather(index)

    # ------------------------------------------------------------------------------------------------ persistence
    def _repr_settings(self) -> list[str]:
        return super()._repr_settings() + [f"frame_shape={self.frame_shape}", f"stack={self.stack}",
                                           f"n_step={self.n_step}", f"gamma={self.gamma}", f"padding={self.padding!r}"]

    def state_dict(self) -> dict:
        with self._lock:
            state = super().state_dict()
            state.update(episode=self._episode, episode_steps=self._steps, count=self._count,
                         layout={"frame_shape": self.frame_shape, "stack": self.stack, "n_step": self.n_step,
                                 "gamma": self.gamma, "padding": self.padding})
            return state

    def _check_state(self, state) -> None:
        super()._check_state(state)
        self._require(state, ("episode", "episode_steps", "count", "layout"))
        layout = {"frame_shape": self.frame_shape, "stack": self.stack, "n_step": self.n_step,
                  "gamma": self.gamma, "padding": self.padding}
        if state["layout"] != layout:
            raise ValueError(f"state was saved with {state['layout']}, this buffer has {layout}")

    def load_state_dict(self, state: dict) -> None:
        with self._lock:
            super().load_state_dict(state)
            self._views = None
            self._episode, self._steps, self._count = state["episode"], state["episode_steps"], state["count"]


class PrioritizedFrameStackReplayBuffer(FrameStackReplayBuffer, PrioritizedReplayBuffer):
    """Proportional prioritized replay over stacked frames: FrameStackReplayBuffer's storage and sampling, with
    PrioritizedReplayBuffer's priorities (alpha, beta, beta_final, beta_steps, eps keyword arguments). A slot gets
    the largest priority seen so far when it becomes drawable and a 0 leaf (never drawn) when it stops being so.
    `sample` adds "weight"."""

    _gathers_fields = False

    def _set_sampleable(self, slots: list[int], flag: bool) -> None:
        super()._set_sampleable(slots, flag)
        if slots:
            index = torch.tensor(slots, dtype=torch.int64)
            if flag:
                self._tree.update(index, torch.full((len(slots),), self._max_priority, dtype=torch.float64),
                                  alpha=self.alpha)
            else:  # a 0 leaf: out of the sum and of the min
                self._tree.update(index, torch.zeros(len(slots), dtype=torch.float64), eps=0.0, alpha=1.0)

    def sample(self, batch_size: int, beta: Optional[float] = None) -> dict[str, torch.Tensor]:
        return PrioritizedReplayBuffer.sample(self, batch_size, beta)

    def update_priorities(self, index, priority) -> None:
        """As PrioritizedReplayBuffer's, except that slots which stopped being drawable since they were sampled
        (overwritten) keep their 0 leaf."""
        with self._lock:
            index = as_vector(index, torch.int64, self.device)
            priority = as_vector(priority, torch.float64, self.device)
            if index.numel() != priority.numel():
                raise ValueError(f"index has {index.numel()} entries but priority has {priority.numel()}")
            if not bool(((priority >= 0) & (priority < float("inf"))).all()):
                raise ValueError("priorities must be finite and non-negative (pass |TD error|)")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._size):
                raise IndexError(f"index out of range [0, {self._size}): min {int(index.min())}, "
                                 f"max {int(index.max())}")
            keep = self._storage["sampleable"][index]
            super().update_priorities(index[keep], priority[keep])
