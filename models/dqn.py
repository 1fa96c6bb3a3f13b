"""DQN (Mnih et al. 2013; Nature 2015) on dlcore: replay buffers from dlcore.rl, the fused Adam from dlcore.optim.

Networks
    QMLP(obs_dim, n_actions, hidden)               vector observations (CartPole)
    QConvNet(n_actions, in_channels, layout)       stacked 84×84 frames: layout "2013" (16 8×8/4, 32 4×4/2, FC 256)
                                                   or "nature" (32 8×8/4, 64 4×4/2, 64 3×3/1, FC 512), each conv
                                                   a dlcore.nn.Conv2dReLU
The stock twin (`stock=True`) is plain torch.nn with the same state_dict keys.

Training (`dlcore train dqn`, or `train(DQNConfig.for_env(name, ...))`): ε-greedy with a linear schedule, a target
network copied every `target_update` gradient steps, Huber loss, optional Double DQN (the online net picks the next
action, the target net values it), uniform or proportional prioritized replay (importance weights scale each
sample's loss; |δ| becomes the new priority).
Vector observations (CartPole-v1): QMLP and ReplayBuffer / PrioritizedReplayBuffer. Atari (`ALE/...`, ale-py):
gymnasium's AtariPreprocessing (84×84 grey, frame skip 4, up to 30 no-ops) and FrameStackObservation(4), the Nature
QConvNet, and dlcore.rl's frame-stack buffers (each frame stored once, n-step returns); `DQNConfig.for_env` takes
the Atari settings of ATARI_DEFAULTS (Nature-paper scale, 100k buffer) unless told otherwise. Greedy evaluation every `eval_every` steps; "solved" is a greedy mean return at or
above `solve_return` over `solve_episodes` episodes (CartPole-v1: 475 over 100), and training stops there.
Writes returns.csv, returns.png, checkpoint.pt (resume with --resume) and summary.json to --out.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlcore import registry
from dlcore.models._training import write_summary
from dlcore.models._training import Progress, add_dataclass_arguments


# ---------------------------------------------------------------------------------------------------- networks
class QMLP(nn.Module):
    """Q-values for vector observations: Linear → ReLU per hidden width, then one output per action.
    Input [B, obs_dim] float32, output [B, n_actions]. dlcore and stock share this layout: dlcore.nn's fused
    LinearReLUDropout(p=0) measured slower here (fwd+bwd, CPU, B64: 4→256 0.44×, 256→256 0.63× nn.Linear + ReLU;
    its autograd.Function costs more than the ReLU pass it saves; the Nature head 3136→512 at B32: 0.98–1.07×)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden=(256, 256), stock: bool = False):
        super().__init__()
        widths = [obs_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], n_actions)
        self.stock = stock

    def forward(self, x):
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


CONV_LAYOUTS = {  # (out_channels, kernel, stride) per conv, then the hidden FC width
    "2013": ([(16, 8, 4), (32, 4, 2)], 256),
    "nature": ([(32, 8, 4), (64, 4, 2), (64, 3, 1)], 512),
}


class QConvNet(nn.Module):
    """Q-values from stacked frames [B, in_channels, 84, 84] (uint8 0–255 or float already scaled to [0, 1]) →
    [B, n_actions]. Convolutions are dlcore.nn.Conv2dReLU, the hidden layer dlcore.nn.Linear (stock: nn.Conv2d then
    ReLU, nn.Linear; same state_dict keys)."""

    def __init__(self, n_actions: int, in_channels: int = 4, layout: str = "nature", stock: bool = False,
                 frame_size: int = 84):
        super().__init__()
        if layout not in CONV_LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(CONV_LAYOUTS)}, got {layout!r}")
        from dlcore.nn import Conv2dReLU, Linear

        convs, hidden = CONV_LAYOUTS[layout]
        conv_cls = nn.Conv2d if stock else Conv2dReLU
        self.convs = nn.ModuleList()
        size, channels = frame_size, in_channels
        for out_channels, kernel, stride in convs:
            self.convs.append(conv_cls(channels, out_channels, kernel, stride))
            size, channels = (size - kernel) // stride + 1, out_channels
        self.fc = (nn.Linear if stock else Linear)(channels * size * size, hidden)  # skinny GEMM when acting
        self.head = nn.Linear(hidden, n_actions)
        self.stock = stock

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        for conv in self.convs:
            x = F.relu(conv(x)) if self.stock else conv(x)
        return self.head(F.relu(self.fc(x.flatten(1))))


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class DQNConfig:
    env: str = "CartPole-v1"
    steps: int = 100_000            # environment steps at most (stops earlier once solved)
    seed: int = 0
    buffer: int = 100_000
    prioritized: bool = False
    alpha: float = 0.6
    beta: float = 0.4
    batch: int = 64
    lr: float = 2.3e-3
    gamma: float = 0.99
    learning_starts: int = 1000
    train_every: int = 256          # environment steps between training rounds ...
    gradient_steps: int = 128       # ... of this many gradient steps
    target_update: int = 128        # gradient steps between target-network copies (one training round)
    max_grad_norm: float = 10.0
    eps_start: float = 1.0
    eps_final: float = 0.04
    eps_fraction: float = 0.16      # of `steps`, over which ε falls linearly
    double: bool = True
    hidden: tuple = (256, 256)
    eval_every: int = 5_000
    eval_episodes: int = 10         # a quick greedy check; the full `solve_episodes` run only when it passes
    solve_return: float = 475.0
    solve_episodes: int = 100
    n_step: int = 1                 # n-step returns (frame-stack buffers, i.e. Atari)
    layout: str = "nature"          # QConvNet layout for image observations: "nature" or "2013"
    device: str = "cpu"             # where the networks and the replay storage live
    out: str = "runs/dqn"
    resume: bool = False
    checkpoint_every: int = 10_000
    progress: bool = True

    @classmethod
    def for_env(cls, env: str = "CartPole-v1", **overrides) -> "DQNConfig":
        """The defaults for `env` (ATARI_DEFAULTS for ALE/ environments), then `overrides`."""
        base = dict(ATARI_DEFAULTS) if env.startswith("ALE/") else {}
        return cls(**{**base, **overrides, "env": env})


# Atari (Mnih et al. 2015 scale, with a 100k buffer and 3-step prioritized replay to fit a few hours of one GPU):
# a run of `steps` reaches Pong's +18 in roughly 1–2M steps.
ATARI_DEFAULTS = dict(steps=2_000_000, buffer=100_000, prioritized=True, n_step=3, batch=32, lr=1e-4,
                      learning_starts=20_000, train_every=4, gradient_steps=1, target_update=2_000,
                      eps_final=0.01, eps_fraction=0.05, eval_every=100_000, eval_episodes=3, solve_return=18.0,
                      solve_episodes=10, checkpoint_every=100_000)


def _gym(name: str):
    """gymnasium, with the Atari environments registered for an ALE/ name; ValueError for a name gymnasium does not
    know (before any training starts)."""
    try:
        import gymnasium as gym
    except ImportError as exc:
        raise RuntimeError("dlcore train dqn needs gymnasium (pip install gymnasium)") from exc
    if name.startswith("ALE/"):
        try:
            import ale_py
        except ImportError as exc:
            raise RuntimeError(f"{name} needs ale-py, which ships the Atari ROMs (pip install ale-py "
                               "opencv-python-headless)") from exc
        gym.register_envs(ale_py)
    try:
        gym.spec(name)
    except gym.error.Error as exc:
        raise ValueError(f"unknown gymnasium environment {name!r}: {exc}") from None
    return gym


def _make_env(name: str):
    gym = _gym(name)
    if not name.startswith("ALE/"):
        return gym.make(name)
    # frame skipping is AtariPreprocessing's (max over the last two frames), so the raw env must not skip
    env = gym.make(name, frameskip=1, repeat_action_probability=0.0)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84, grayscale_obs=True)
    return gym.wrappers.FrameStackObservation(env, 4)


def epsilon(cfg: DQNConfig, step: int) -> float:
    span = max(1, int(cfg.eps_fraction * cfg.steps))
    return cfg.eps_final + (cfg.eps_start - cfg.eps_final) * max(0.0, 1.0 - step / span)


def td_targets(q_net, target_net, batch, gamma: float, double: bool) -> torch.Tensor:
    """y = r + γ (1 − terminated) Q_target(s', a*), a* = argmax_a Q_online(s', a) (Double DQN) or
    argmax_a Q_target(s', a) (DQN); with n-step returns the batch's "discount" (γᵐ) stands for γ."""
    with torch.no_grad():
        next_q = target_net(batch["next_obs"])
        best = (q_net(batch["next_obs"]) if double else next_q).argmax(1, keepdim=True)
        discount = batch.get("discount", gamma)
        return batch["reward"] + discount * (1.0 - batch["terminated"]) * next_q.gather(1, best).squeeze(1)


def greedy_action(q_net, obs, device="cpu") -> int:
    x = torch.as_tensor(obs, device=device)
    if x.dtype != torch.uint8:  # frames stay uint8 (the conv net scales them); vectors go in as float32
        x = x.float()
    with torch.no_grad():
        return int(q_net(x[None]).argmax())


def greedy_returns(q_net, env_name: str, episodes: int, seed: int, device="cpu") -> list[float]:
    env = _make_env(env_name)
    returns = []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(greedy_action(q_net, obs, device))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def train(cfg: DQNConfig) -> dict:
    """Train until solved or `cfg.steps`; returns the summary also written to <out>/summary.json."""
    import dlcore

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    env = _make_env(cfg.env)
    shape, n_actions = tuple(env.observation_space.shape), int(env.action_space.n)
    os.makedirs(cfg.out, exist_ok=True)
    q_net, buffer, frames = _network_and_buffer(cfg, shape, n_actions)
    target_net = copy.deepcopy(q_net).requires_grad_(False)
    optimizer = dlcore.optim.Adam(q_net.parameters(), lr=cfg.lr)
    device = cfg.device

    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    start, episode_returns, evals, gradient_steps = 0, [], [], 0
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=False)
        q_net.load_state_dict(ckpt["q"]), target_net.load_state_dict(ckpt["target"])
        optimizer.load_state_dict(ckpt["optimizer"]), buffer.load_state_dict(ckpt["buffer"])
        start, episode_returns, evals = ckpt["step"], ckpt["episode_returns"], ckpt["evals"]
        gradient_steps = ckpt["gradient_steps"]
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])

    def save_checkpoint(step):
        torch.save({"q": q_net.state_dict(), "target": target_net.state_dict(), "optimizer": optimizer.state_dict(),
                    "buffer": buffer.state_dict(), "step": step, "episode_returns": episode_returns,
                    "evals": evals, "gradient_steps": gradient_steps, "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, ckpt_path)

    solved_at, t0 = None, time.perf_counter()
    obs, _ = env.reset(seed=cfg.seed + start)
    episode_return = 0.0
    progress = Progress("dqn", cfg.progress, cfg.steps, start)
    for step in range(start, cfg.steps):
        if rng.random() < epsilon(cfg, step):
            action = int(rng.integers(n_actions))
        else:
            action = greedy_action(q_net, obs, device)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        # a time-limit truncation is not a terminal state: its target still bootstraps from next_obs
        if frames:
            buffer.add(obs, action, float(reward), next_obs, terminated=terminated, truncated=truncated)
        else:
            buffer.add(obs=torch.as_tensor(obs), action=action, reward=float(reward),
                       next_obs=torch.as_tensor(next_obs), terminated=float(terminated))
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            episode_returns.append(episode_return)
            episode_return = 0.0
            obs, _ = env.reset()
        if step >= cfg.learning_starts and (step + 1) % cfg.train_every == 0:
            for _ in range(cfg.gradient_steps):
                batch = buffer.sample(cfg.batch)
                y = td_targets(q_net, target_net, batch, cfg.gamma, cfg.double)
                q = q_net(batch["obs"]).gather(1, batch["action"][:, None]).squeeze(1)
                loss_each = F.smooth_l1_loss(q, y, reduction="none")  # Huber, δ = 1
                loss = (loss_each * batch["weight"]).mean() if cfg.prioritized else loss_each.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(q_net.parameters(), cfg.max_grad_norm)
                optimizer.step()
                if cfg.prioritized:
                    buffer.update_priorities(batch["index"], (y - q).detach().abs())
                gradient_steps += 1
                if gradient_steps % cfg.target_update == 0:
                    target_net.load_state_dict(q_net.state_dict())
        if (step + 1) % cfg.eval_every == 0:
            quick = greedy_returns(q_net, cfg.env, cfg.eval_episodes, seed=10_000 + step, device=device)
            mean = float(np.mean(quick))
            if mean >= cfg.solve_return:  # the full test only when the quick one passes
                mean = float(np.mean(greedy_returns(q_net, cfg.env, cfg.solve_episodes, seed=20_000 + step,
                                                    device=device)))
            evals.append({"step": step + 1, "greedy_mean": mean, "seconds": time.perf_counter() - t0})
            progress.note(f"step {step + 1}: greedy mean {mean:.1f}")
            if mean >= cfg.solve_return and cfg.solve_episodes:
                solved_at = step + 1
                progress.advance(step + 1)
                break
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(step + 1)
        if (step + 1) % 200 == 0:
            recent = np.mean(episode_returns[-20:]) if episode_returns else 0.0
            progress.advance(step + 1, f"ε {epsilon(cfg, step):.2f}  return(20) {recent:.1f}")
    progress.close()
    env.close()
    final_step = solved_at or cfg.steps
    save_checkpoint(final_step)
    torch.save(q_net.state_dict(), os.path.join(cfg.out, "q_net.pt"))
    _write_returns(cfg.out, episode_returns, evals, cfg)
    summary = {"env": cfg.env, "solved": solved_at is not None, "solved_at_step": solved_at,
               "solve_criterion": f"greedy mean return >= {cfg.solve_return} over {cfg.solve_episodes} episodes",
               "last_eval": evals[-1] if evals else None, "episodes": len(episode_returns),
               "gradient_steps": gradient_steps, "seconds": round(time.perf_counter() - t0, 1),
               "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _network_and_buffer(cfg: DQNConfig, shape: tuple, n_actions: int):
    """(Q-network, replay buffer, whether the buffer stores frames) for observations of `shape`: vectors [d] get
    QMLP and a transition buffer, stacked frames [stack, H, W] the conv net and a frame-stack buffer."""
    from dlcore.rl import (FrameStackReplayBuffer, PrioritizedFrameStackReplayBuffer, PrioritizedReplayBuffer,
                           ReplayBuffer)

    prioritized = dict(alpha=cfg.alpha, beta=cfg.beta,
                       beta_steps=max(1, (cfg.steps - cfg.learning_starts) // cfg.train_every * cfg.gradient_steps))
    if len(shape) == 3 and shape[1] == shape[2]:
        q_net = QConvNet(n_actions, in_channels=shape[0], layout=cfg.layout, frame_size=shape[1]).to(cfg.device)
        cls = PrioritizedFrameStackReplayBuffer if cfg.prioritized else FrameStackReplayBuffer
        buffer = cls(cfg.buffer, frame_shape=shape[1:], stack=shape[0], n_step=cfg.n_step, gamma=cfg.gamma,
                     device=cfg.device, seed=cfg.seed, **(prioritized if cfg.prioritized else {}))
        return q_net, buffer, True
    if len(shape) != 1:
        raise ValueError(f"{cfg.env} has observations of shape {shape}; this trainer takes vectors [d] or stacked "
                         "square frames [stack, H, H] (e.g. AtariPreprocessing + FrameStackObservation)")
    if cfg.n_step != 1:
        raise ValueError("n_step > 1 is supported with frame observations (the frame-stack buffers) only")
    fields = {"obs": (shape, torch.float32), "action": ((), torch.int64), "reward": ((), torch.float32),
              "next_obs": (shape, torch.float32), "terminated": ((), torch.float32)}
    q_net = QMLP(shape[0], n_actions, cfg.hidden).to(cfg.device)
    if cfg.prioritized:
        return q_net, PrioritizedReplayBuffer(cfg.buffer, fields, device=cfg.device, seed=cfg.seed,
                                              **prioritized), False
    return q_net, ReplayBuffer(cfg.buffer, fields, device=cfg.device, seed=cfg.seed), False


def _write_returns(out: str, episode_returns: list, evals: list, cfg: DQNConfig) -> None:
    with open(os.path.join(out, "returns.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["episode", "return"])
        w.writerows(enumerate(episode_returns))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(episode_returns, lw=0.6, alpha=0.5, label="episode return (ε-greedy)")
    if len(episode_returns) >= 20:
        smooth = np.convolve(episode_returns, np.ones(20) / 20, mode="valid")
        ax.plot(np.arange(19, len(episode_returns)), smooth, label="mean of 20")
    ax.axhline(cfg.solve_return, ls="--", c="gray", lw=0.8, label=f"solved ({cfg.solve_return:g})")
    ax.set_xlabel("episode"), ax.set_ylabel("return"), ax.set_title(f"DQN on {cfg.env} (dlcore)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "returns.png"), dpi=120)
    plt.close(fig)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(p, DQNConfig())
    # flags left out take the environment's defaults (DQNConfig.for_env): None marks them as not given
    p.set_defaults(**{f.name: None for f in fields(DQNConfig)})
    p.epilog = ("Defaults shown are CartPole's; ALE/ environments start from models.dqn.ATARI_DEFAULTS. "
                "Full Pong run: dlcore train dqn --env ALE/Pong-v5 --device cuda --out runs/pong")


def _run(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(DQNConfig)}
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in names and v is not None}
    cfg = DQNConfig.for_env(**given)
    try:
        _gym(cfg.env)
    except ValueError as exc:
        print(f"dlcore train dqn: error: --env: {exc}", file=sys.stderr)
        return 2
    summary = train(cfg)
    print(json.dumps({k: summary[k] for k in ("solved", "solved_at_step", "last_eval", "seconds")}, default=str))
    print(f"wrote {cfg.out}/returns.csv, returns.png, checkpoint.pt, q_net.pt, summary.json")
    return 0 if summary["solved"] or not cfg.solve_episodes else 1


registry.register("train", "dqn", help="DQN on a gymnasium environment (CartPole-v1 by default)", run=_run)(
    _add_arguments)
