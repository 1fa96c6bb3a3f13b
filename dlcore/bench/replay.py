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
        prio = buf._tree.sum[buf._tree.size:buf._tree.size + n].float().clone()

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
    prio = buf._tree.sum[buf._tree.size:buf._tree.size + N].clone()
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


def cases(device: str) -> list[Case]:
    if device != "cpu":
        return [Case("replay", "prioritized sample 4096 of 10M + gather", device,
                     _sample_setup(GPU_N, GPU_BATCH, device), baseline="torch multinomial", max_ms=0.100,
                     ops=("sum_tree_sample",))]
    return [
        Case("replay", "prioritized sample 256 of 1M + gather", device, _sample_setup(N, BATCH, device),
             baseline="torch multinomial", max_ms=0.030),
        Case("replay", "priority update 256 of 1M", device, _setup_update, baseline="torch index_put",
             max_ms=0.008),
    ]
