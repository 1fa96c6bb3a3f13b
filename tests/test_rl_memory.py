"""dlcore.rl._memory: large host tensors for replay storage and sum-trees, on transparent huge pages."""
import gc
import os

import pytest
import torch

from dlcore.rl import PrioritizedReplayBuffer, SumTree, _memory

THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode():
    try:
        text = open(THP).read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("shape,dtype,value", [((3,), torch.float32, 0.0), ((1 << 20,), torch.float64, 0.0),
                                               ((1 << 19,), torch.float64, float("inf")),
                                               ((70001, 3, 7), torch.uint8, 5), ((1 << 20,), torch.bool, 0)])
def test_zeros_and_full_are_torch_zeros_and_full(shape, dtype, value):
    got = _memory.full(shape, value, dtype)
    assert got.shape == shape and got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, torch.full(shape, value, dtype=dtype))
    got.view(-1)[-1] = 1  # writable to its last element
    view = got.view(-1)[1:]
    del got
    gc.collect()
    assert int(view[-1]) == 1  # a view keeps the memory alive


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_large_trees_and_storage_sit_on_huge_pages():
    tree = SumTree(1 << 20)
    tree.update(torch.arange(0, 1 << 20, 4096), torch.ones(256))
    tree.sum.fill_(0.0)  # touch every page
    assert _anon_huge_kb(tree.sum.data_ptr() + tree.sum.numel() * 4) > 0
    buf = PrioritizedReplayBuffer(1 << 20, fields={"obs": ((4,), torch.float32)})
    buf._storage["obs"].fill_(1.0)
    assert _anon_huge_kb(buf._storage["obs"].data_ptr() + (8 << 20)) > 0


def test_saved_buffer_loads_into_huge_page_storage(tmp_path):
    a = PrioritizedReplayBuffer(200_000, seed=3)
    a.extend(obs=torch.randn(200_000, 4), action=torch.randint(0, 5, (200_000,)))
    a.save(tmp_path / "buf.pt")
    b = PrioritizedReplayBuffer(200_000, seed=9)
    b.load(tmp_path / "buf.pt")
    for name in ("obs", "action"):
        assert torch.equal(a._storage[name], b._storage[name])
    assert torch.equal(a.sample(64)["index"], b.sample(64)["index"])
