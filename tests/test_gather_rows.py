"""gather_rows (dlcore.rl.gather): every backend against index_select, on fields of every row size the C++ copy
specialises (1, 2, 4, 8, 16 bytes) and odd ones (3 bytes, a 7x9 float row, an 84x84 uint8 frame); bad input."""
import os
import time

import pytest
import torch

import dlcore
from dlcore.rl.gather import OP, gather_rows
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
PAIRS = backend_device_pairs(OP)


def _fields(rows, gen, device):
    return [
        torch.randint(0, 255, (rows,), generator=gen, dtype=torch.uint8),
        torch.randint(-999, 999, (rows,), generator=gen, dtype=torch.int16),
        torch.randn(rows, generator=gen),
        torch.randint(0, 2**40, (rows,), generator=gen),
        torch.randn(rows, 4, generator=gen),
        torch.randint(0, 255, (rows, 3), generator=gen, dtype=torch.uint8),
        torch.randn(rows, 7, 9, generator=gen, dtype=torch.float64),
        torch.randint(0, 255, (rows, 84, 84), generator=gen, dtype=torch.uint8),
        torch.rand(rows, 2, generator=gen) < 0.5,
    ]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("rows,n", [(1, 1), (7, 129), (1000, 7), (129, 0)])
def test_matches_index_select(backend, device, rows, n):
    gen = torch.Generator().manual_seed(SEED + rows + n)
    fields = [f.to(device) for f in _fields(rows, gen, device)]
    index = torch.randint(0, rows, (n,), generator=gen).to(device)
    with dlcore.use_backend(backend):
        out = gather_rows(fields, index)
    for f, o in zip(fields, out):
        assert o.dtype == f.dtype and o.shape == (n, *f.shape[1:])
        assert torch.equal(o, f.index_select(0, index))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_out_of_range_index_raises_before_writing(backend, device):
    fields = [torch.arange(10, device=device)]
    with dlcore.use_backend(backend):
        for bad in ([0, 10], [-1, 3]):
            with pytest.raises(IndexError, match="out of range"):
                gather_rows(fields, torch.tensor(bad, device=device))
        with pytest.raises(IndexError, match="out of range"):  # `limit` bounds rows that are not yet written
            gather_rows(fields, torch.tensor([6]), limit=5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="index"):
        gather_rows([torch.zeros(3)], torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        gather_rows([torch.zeros(3, 4).t()], torch.tensor([0]))
    with pytest.raises(ValueError, match="row dimension"):
        gather_rows([torch.tensor(1.0)], torch.tensor([0]))
    assert gather_rows([], torch.tensor([0])) == []
