"""as_layout (dlcore/ops/batch_norm.py) and its CPU batched transpose (csrc/cpu/layout.cpp): NCHW ↔ channels_last
for every word size, odd shapes (including the C ≤ 4 interleave paths and ragged 8×8 blocks), against torch's
own .contiguous(memory_format=...), into a poisoned output; what it must leave to torch."""
import os
import time

import pytest
import torch

from dlcore import _ext
from dlcore.ops.batch_norm import as_layout, dense_like

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
CL = torch.channels_last
SHAPES = [(1, 3, 224, 17), (2, 1, 5, 7), (3, 2, 9, 1), (2, 4, 7, 7), (5, 8, 8, 8), (2, 129, 13, 11), (1, 64, 1, 129),
          (3, 17, 33, 3), (1, 1000, 2, 5), (16, 256, 13, 13)]
DTYPES = [torch.float32, torch.bfloat16, torch.uint8, torch.float64, torch.int64, torch.bool, torch.float16]


def _random(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=gen).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.skipif(_ext.cpu is None, reason="CPU extension not built")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_directions_match_torch(shape, dtype):
    gen = torch.Generator().manual_seed(SEED + sum(shape))
    x = _random(shape, dtype, gen)
    to_cl = as_layout(x, True)
    assert to_cl.is_contiguous(memory_format=CL) and to_cl.dtype == dtype and to_cl.shape == x.shape
    assert torch.equal(to_cl, x) and to_cl.stride() == x.contiguous(memory_format=CL).stride()
    back = as_layout(to_cl, False)
    assert back.is_contiguous() and torch.equal(back, x)
    # the kernel itself writes every word of a poisoned output
    n, c, h, w = shape
    if dtype.is_floating_point:
        out = torch.full(shape, float("nan"), dtype=dtype).contiguous(memory_format=CL)
        _ext.cpu.batched_transpose(x.data_ptr(), out.data_ptr(), n, c, h * w, x.element_size())
        assert torch.equal(out, x)


def test_what_it_leaves_alone_or_to_torch():
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 3, 5, 6, generator=gen)
    assert as_layout(x, False) is x
    cl = x.contiguous(memory_format=CL)
    assert as_layout(cl, True) is cl
    strided = torch.randn(2, 3, 10, 6, generator=gen)[:, :, ::2]  # neither layout: torch's copy
    assert torch.equal(as_layout(strided, True), strided) and as_layout(strided, True).is_contiguous(memory_format=CL)
    leaf = x.clone().requires_grad_()
    moved = as_layout(leaf, True)  # autograd records torch's copy
    moved.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))
    view = torch.randn(5, 3, 7, 6, generator=gen)[2:]  # dense, at a storage offset
    assert torch.equal(as_layout(view, True), view) and torch.equal(as_layout(as_layout(view, True)[1:], False),
                                                                    view[1:])
    five = torch.randn(2, 3, 4, 5, 6, generator=gen)
    assert as_layout(five, True).is_contiguous(memory_format=torch.channels_last_3d)
    assert dense_like(x, cl).is_contiguous(memory_format=CL) and dense_like(cl, x).is_contiguous()


def test_bad_word_size_raises():
    if _ext.cpu is None:
        pytest.skip("CPU extension not built")
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="word_bytes"):
        _ext.cpu.batched_transpose(x.data_ptr(), x.data_ptr(), 1, 2, 2, 3)
