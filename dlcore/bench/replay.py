"""Benchmark cases for prioritized replay: sample 256 of 1M transitions (4-float observations, gathered) and update
256 priorities. Stock PyTorch peer: priorities in a tensor, torch.multinomial over all of them per batch (O(N)),
the same gather, and an index assignment for the update. The issue's absolute anchors: cpprb ~300 µs per sample,
~40 µs per update on this machine; targets ≤ 30 µs and ≤ 8 µs. Both cases touch fresh random slots every call
(sampling draws new offsets; updates rotate 64 index sets), so tree paths and rows come from memory as in training."""
from __future__ import annotations

import torch

from dlcore.bench.harness import DLCORE, Case

N, BATCH = 1 << 20, 256          # the CPU case
GPU_N, GPU_BATCH = 10_000_000, 4096  # the GPU case: batch 4096 from 10M, target ≤ 100 µs


def _filled(n: int = N, device: str = "cpu", seed: int = 0):
    from dlcore.rl import PrioritizedReplayBuffer

    gen = torch.Generator().manual_seed(seed)
    buf = PrioritizedReplayBuffer(n, device=device, seed=seed)
    buf.extend(obs=torch.randn(n, 4, generator=gen), action=torch.randint(0, 4, (n,), generator=gen),
               reward=torch.randn(n, generator=gen))
    buf.update_priorities(torch.arange(n), torch.rand(n, generator=gen) * 2)
    return buf


def _sample_setup(n: int, batch: int, device: str):
    def setup(n_sets: int):
        buf = _filled(n, device)
        store = buf._storage
        prio = buf._tree.leaf_values[:n].float().clone()

        def stock():
            idx = torch.multinomial(prio, batch, replacement=True)
            p = prio[idx] / prio.sum()
            weight = (n * p).pow(-0.4)
            return {k: v.index_select(0, idx) for k, v in store.items()}, weight / weight.max()

        return {DLCORE: lambda: buf.sample(batch), "torch multinomial": stock}

    return setup


def _setup_update(n_sets: int):
    # fresh indices every call (64 sets in rotation), as in training: fixed ones would keep their tree paths cached
    buf = _filled()
    prio = buf._tree.leaf_values[:N].clone()
    gen = torch.Generator().manual_seed(1)
    sets = [(torch.randint(0, N, (BATCH,), generator=gen), torch.rand(BATCH, generator=gen))
            for _ in range(max(64, n_sets))]
    turn = iter(range(1 << 62))

    def dlcore_update():
        index, value = sets[next(turn) % len(sets)]
        buf.update_priorities(index, value)

    def stock():
        index, value = sets[next(turn) % len(sets)]
        prio[index] = (value.double() + 1e-6).pow(0.6)

    return {DLCORE: dlcore_update, "torch index_put": stock}


ATARI_CAPACITY, ATARI_BATCH, STACK, FRAME = 200_000, 32, 4, (84, 84)  # 1.4 GB of frames: far past the LLC
ATARI_CAPACITY_GPU = 50_000  # 350 MB, past an H100's 50 MB L2; filled step by step, so kept small on a GPU
ATARI_BYTES = 2 * (2 * ATARI_BATCH * STACK * FRAME[0] * FRAME[1])  # obs + next_obs stacks, read + written


def _atari_setup(device: str, capacity: int = ATARI_CAPACITY):
    def setup(n_sets: int):
        from dlcore.rl import FrameStackReplayBuffer
        from dlcore.rl import frames as frames_op

        gen = torch.Generator().manual_seed(0)
        pool = torch.randint(0, 256, (64, *FRAME), generator=gen, dtype=torch.uint8).to(device)
        buf = FrameStackReplayBuffer(capacity, frame_shape=FRAME, stack=STACK, n_step=3, device=device, seed=0)
        lengths = torch.randint(500, 3000, (capacity // 500,), generator=gen).tolist()
        step, episode = 0, 0
        while step < capacity - 1:
            for t in range(min(lengths[episode], capacity - 1 - step)):
                frame = pool[step % 64]
                buf.add(frame, t % 6, 0.0, frame, terminated=t == lengths[episode] - 1)
                step += 1
            episode += 1
        st = buf._storage

        def stock():  # the same storage, assembled with torch ops: the reference plan and index_select
            index = torch.randint(0, buf._size - 8, (ATARI_BATCH,), generator=gen)
            frames, *_ = frames_op.reference_plan(index.to(device), st["ended"], st["reward"], st["terminated"],
                                                  st["episode_start"], STACK, 3, 0.99)
            return st["frame"].index_select(0, frames.reshape(-1))

        return {DLCORE: lambda: buf.sample(ATARI_BATCH), "torch indexing": stock}

    return setup


def cases(device: str) -> list[Case]:
    if device != "cpu":
        return [Case("replay", "prioritized sample 4096 of 10M + gather", device,
                     _sample_setup(GPU_N, GPU_BATCH, device), baseline="torch multinomial", max_ms=0.100,
                     ops=("sum_tree_sample_gather",)),
                Case("replay", f"Atari stacks: sample {ATARI_BATCH} (obs + next_obs, 4×84×84) of 50k frames", device,
                     _atari_setup(device, ATARI_CAPACITY_GPU), bytes=ATARI_BYTES, baseline="torch indexing",
                     ops=("frame_stack_sample",), quick=False)]
    return [
        Case("replay", "prioritized sample 256 of 1M + gather", device, _sample_setup(N, BATCH, device),
             baseline="torch multinomial", max_ms=0.030),
        Case("replay", "priority update 256 of 1M", device, _setup_update, baseline="torch index_put",
             max_ms=0.008),
        Case("replay", f"Atari stacks: sample {ATARI_BATCH} (obs + next_obs, 4×84×84) of 200k frames", device,
             _atari_setup(device), bytes=ATARI_BYTES, baseline="torch indexing", bandwidth_target=0.5,
             quick=False),
    ]
