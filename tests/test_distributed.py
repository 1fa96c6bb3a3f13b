"""dlcore Adam under DistributedDataParallel and FSDP2 (DTensor parameters: the local shards are stepped), two
processes on the CPU with gloo, against torch.optim.Adam in the same processes."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def _worker(rank: int, world: int, port: int, mode: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import dlcore

        models = [_model(0), _model(0)]
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            models = [DDP(m) for m in models]
        else:
            from torch.distributed.fsdp import fully_shard

            for m in models:
                fully_shard(m)
        opts = [dlcore.optim.AdamW(models[0].parameters(), lr=1e-2, amsgrad=True),
                torch.optim.AdamW(models[1].parameters(), lr=1e-2, amsgrad=True, foreach=False)]
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(6):
            x, y = torch.randn(8, 12, generator=gen), torch.randn(8, 5, generator=gen)
            for m, opt in zip(models, opts):
                opt.zero_grad()
                ((m(x) - y) ** 2).mean().backward()
                opt.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            if mode == "fsdp2":
                assert type(a).__name__ == "DTensor"
                assert type(opts[0].state[a]["exp_avg"]).__name__ == "DTensor"  # state sharded like the param
                a, b = a.full_tensor(), b.full_tensor()
            assert torch.allclose(a, b, atol=1e-5), (mode, rank, (a - b).abs().max())
        # both ranks done before either tears down: a rank destroying the group while its peer still finishes the
        # last collective aborted a gloo thread once ("terminate called without an active exception"); on a failed
        # assertion this is skipped, that rank exits and mp.spawn stops the other
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_gloo(mode):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    try:
        mp.spawn(_worker, args=(2, _free_port(), mode), nprocs=2, join=True)
    except mp.ProcessExitedException as exc:
        # A worker killed by a signal (not an assertion: that raises ProcessRaisedException and is never retried):
        # gloo aborted a thread at teardown in ~1 of 15 runs on the 2-core VMs ("terminate called without an active
        # exception"). Run once more on a fresh port; a real crash repeats and fails here.
        if exc.signal_name is None:
            raise
        mp.spawn(_worker, args=(2, _free_port(), mode), nprocs=2, join=True)
