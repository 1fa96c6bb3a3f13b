"""Reinforcement-learning pieces: replay buffers with sum-tree prioritized sampling.

Imported on demand (`import dlcore.rl`): it loads numba, which `import dlcore` does not need."""
from dlcore.rl.buffers import PrioritizedReplayBuffer, ReplayBuffer
from dlcore.rl.frames import FrameStackReplayBuffer, PrioritizedFrameStackReplayBuffer
from dlcore.rl.nstep import NStepWriter
from dlcore.rl.sum_tree import SumTree

__all__ = ["ReplayBuffer", "PrioritizedReplayBuffer", "FrameStackReplayBuffer", "PrioritizedFrameStackReplayBuffer",
           "NStepWriter", "SumTree"]
