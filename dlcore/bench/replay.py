"""Benchmark cases for prioritized replay: sample 256 of 1M transitions (4-float observations, gathered) and update
256 priorities. Stock PyTorch peer: priorities in a tensor, torch.multinomial over all of them per batch (O(N)),
the same gather, and an index assignment for the update. The issue's absolute anchors: cpprb ~300 µs per sample,
~40 µs per update on this machine; targets ≤ 30 µs and ≤ 8 µs."""
from __future__ import annotations

import torch

from dlcore.bench.harness import DLCORE, Case

N, BATCH = 1 << 20, 256


def _filled(seed: int = 0):
    from dlcore.rl import PrioritizedReplayBuffer

    gen = torch.Generator().manual_seed(seed)
    buf = PrioritizedReplayBuffer(N, seed=seed)
    buf.extend(obs=torch.randn(N, 4, generator=gen), action=torch.randint(0, 4, (N,), generator=gen),
               reward=torch.randn(N, generator=gen))
    buf.update_priorities(torch.arange(N), torch.rand(N, generator=gen) * 2)
    return buf


def _setup_sample(n_sets: int):
    buf = _filled()
    store = buf._storage
    prio = buf._tree.sum[buf._tree.size:buf._tree.size + N].float().clone()

    def stock():
        idx = torch.multinomial(prio, BATCH, replacement=True)
        p = prio[idx] / prio.sum()
        weight = (N * p).pow(-0.4)
        return {k: v.index_select(0, idx) for k, v in store.items()}, weight / weight.max()

    return {DLCORE: lambda: buf.sample(BATCH), "torch multinomial": stock}


def _setup_update(n_sets: int):
    buf = _filled()
    prio = buf._tree.sum[buf._tree.size:buf._tree.size + N].clone()
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, N, (BATCH,), generator=gen)
    value = torch.rand(BATCH, generator=gen)

    def stock():
        prio[index] = (value.double() + 1e-6).pow(0.6)

    return {DLCORE: lambda: buf.update_priorities(index, value), "torch index_put": stock}


def cases(device: str) -> list[Case]:
    if device != "cpu":
        return []  # the GPU sampling kernels are not written yet (issue 7)
    return [
        Case("replay", "prioritized sample 256 of 1M + gather", device, _setup_sample, baseline="torch multinomial",
             max_ms=0.030),
        Case("replay", "priority update 256 of 1M", device, _setup_update, baseline="torch index_put",
             max_ms=0.008),
    ]
