"""n-step returns in front of a replay buffer, for one or many environments stepped together.

Each `step(obs, action, reward, next_obs, done, truncated=None)` takes one transition per environment (leading
dimension `num_envs`). Once an environment has n pending transitions, the oldest leaves as

    obs_t, action_t, reward = Σ_{k<n} γᵏ r_{t+k}, next_obs = next_obs_{t+n-1}, done = done_{t+n-1},
    discount = γⁿ                                          (the factor in front of max Q(next_obs) in the target)

and when an episode ends every pending transition of that environment leaves at once, with the returns it has
(m < n rewards, discount γᵐ), so no n-step return crosses an episode boundary. `done` is gymnasium's `terminated`
(the flushed transitions get done = True: no bootstrap); an episode cut by a time limit (`truncated`) flushes with
done = False, so their targets still bootstrap from the last next_obs (pass the episode's final observation there,
not the reset one a vector environment returns).
"""
from __future__ import annotations

import torch


class NStepWriter:
    """Accumulates n-step returns and writes them to `buffer` (a ReplayBuffer or PrioritizedReplayBuffer).

    Args:
        buffer: receives dicts of fields obs, action, reward, next_obs, done, discount.
        n: steps per return (1 writes the transitions as they come, with discount γ).
        gamma: discount factor.
        num_envs: environments stepped together.
    """

    def __init__(self, buffer, n: int = 3, gamma: float = 0.99, num_envs: int = 1):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.buffer, self.n, self.gamma, self.num_envs = buffer, int(n), float(gamma), int(num_envs)
        self._pending: list[list[tuple]] = [[] for _ in range(self.num_envs)]

    def _emit(self, window: list[tuple], done: bool) -> dict:
        obs, action = window[0][0], window[0][1]
        reward = sum(self.gamma ** k * float(t[2]) for k, t in enumerate(window))
        return {"obs": obs, "action": action, "reward": torch.tensor(reward, dtype=torch.float32),
                "next_obs": window[-1][3], "done": torch.tensor(bool(done)),
                "discount": torch.tensor(self.gamma ** len(window), dtype=torch.float32)}

    def step(self, obs, action, reward, next_obs, done, truncated=None) -> int:
        """Add one transition per environment; returns how many n-step transitions went to the buffer.
        done: the episode terminated (gymnasium's `terminated`); truncated (optional): it was cut short (a time
        limit), which ends the n-step windows too but keeps done = False in what they emit."""
        names = ("obs", "action", "reward", "next_obs", "done") + (() if truncated is None else ("truncated",))
        fields = [torch.as_tensor(x) for x in (obs, action, reward, next_obs, done, truncated)[:len(names)]]
        for name, t in zip(names, fields):
            if t.shape[:1] != (self.num_envs,):
                raise ValueError(f"{name} must have a leading dimension of num_envs={self.num_envs}, "
                                 f"got shape {tuple(t.shape)}")
        out = []
        for e in range(self.num_envs):
            window = self._pending[e]
            window.append(tuple(t[e] for t in fields[:4]))
            terminated = bool(fields[4][e])
            if terminated or (truncated is not None and bool(fields[5][e])):
                while window:  # episode over: flush everything, each with the rewards it has
                    out.append(self._emit(window, terminated))
                    window.pop(0)
            elif len(window) == self.n:
                out.append(self._emit(window, False))
                window.pop(0)
        if out:
            self.buffer.extend(**{k: torch.stack([o[k] for o in out]) for k in out[0]})
        return len(out)

    def reset(self) -> None:
        """Drop pending transitions (e.g. after environments were reset without a done)."""
        self._pending = [[] for _ in range(self.num_envs)]
