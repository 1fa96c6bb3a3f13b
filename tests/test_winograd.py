"""Winograd F(4×4,3×3) inference convolutions (dlcore/ops/winograd.py, csrc/cpu/winograd.cpp): the C++ passes and
the torch-op twin against a float64 direct convolution (exact to rounding in float64, within the documented bound in
fp32) on odd shapes, every epilogue, poisoned workspaces; the folded model with winograd=True; when it must not run."""
import copy
import threading

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore import _ext, blocks
from dlcore.models import resnet
from dlcore.ops import winograd

needs_cpp = pytest.mark.skipif(_ext.cpu is None, reason="CPU extension not built")


def _problem(n, c, k, h, w, pad, dtype, residual, gen):
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(k, c, 3, 3, generator=gen, dtype=torch.float64) / (9 * c) ** 0.5
    b = torch.randn(k, generator=gen, dtype=torch.float64)
    ho, wo = h + 2 * pad[0] - 2, w + 2 * pad[1] - 2
    r = torch.randn(n, k, ho, wo, generator=gen, dtype=torch.float64) if residual else None
    return x.to(dtype), wt.to(dtype), b.to(dtype), None if r is None else r.to(dtype)


def _reference(x, wt, b, r, pad, relu):
    y = F.conv2d(x.double(), wt.double(), b.double(), padding=pad)
    if r is not None:
        y = y + r.double()
    return y.clamp_min(0) if relu else y


def _poison_workspace(dtype):
    winograd.release_workspace()
    winograd._buffer(1 << 16, dtype).fill_(float("nan"))  # V/M read before written would show as NaN


SHAPES = [  # n, c, k, h, w, padding
    (1, 1, 1, 3, 3, (0, 0)), (1, 7, 5, 1, 1, (1, 1)), (2, 17, 9, 7, 5, (1, 1)), (3, 16, 33, 9, 13, (2, 1)),
    (1, 33, 16, 13, 7, (0, 2)), (2, 8, 24, 12, 12, (1, 1))]


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True), (False, True)])
def test_passes_are_exact_in_float64(shape, residual, relu):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    n, c, k, h, w, pad = shape
    x, wt, b, r = _problem(n, c, k, h, w, pad, torch.float64, residual, gen)
    _poison_workspace(torch.float64)
    want = _reference(x, wt, b, r, pad, relu)
    u = winograd.transform_weight(wt)
    got = winograd.conv3x3(x, u, b, r, pad, relu)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(winograd.reference_conv(x, u, b, r, pad, relu), want, rtol=1e-11, atol=1e-11)
    # channels_last input and residual, no bias: the same
    cl = torch.channels_last
    got = winograd.conv3x3(x.contiguous(memory_format=cl), u, None, None if r is None else r.contiguous(
        memory_format=cl), pad, relu)
    torch.testing.assert_close(got, _reference(x, wt, torch.zeros_like(b), r, pad, relu), rtol=1e-11, atol=1e-11)


@needs_cpp
@pytest.mark.parametrize("c,k,hw", [(16, 16, 29), (64, 64, 14), (128, 32, 7)])
def test_float32_error_within_the_documented_bound(c, k, hw):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    x, wt, b, r = _problem(2, c, k, hw, hw, (1, 1), torch.float32, True, gen)
    _poison_workspace(torch.float32)
    want = _reference(x, wt, b, r, (1, 1), False)
    got = winograd.conv3x3(x, winograd.transform_weight(wt), b, r, (1, 1), False)
    direct = F.conv2d(x, wt, b, padding=1) + r
    scale = want.abs().max()
    err = float((got.double() - want).abs().max() / scale)
    direct_err = float((direct.double() - want).abs().max() / scale)
    # measured 1.6-2.1e-6 on ResNet shapes with bias and residual (direct: 0.8-1.4e-6); the bound leaves room for
    # unlucky draws, and an indexing mistake is of the order of the outputs themselves
    assert err < 1e-5, (err, direct_err)


def _pair():
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    stock = resnet.resnet18(num_classes=7, stock=True)
    with torch.no_grad():
        for m in stock.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return resnet.twin_of(stock), stock.eval()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_resnet_with_winograd_keeps_the_function(dtype):
    ours, stock = _pair()
    ours, stock = ours.to(dtype), stock.to(dtype)
    x = torch.randn(2, 3, 40, 40, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = stock(x)
        fused = dlcore.fuse_for_inference(copy.deepcopy(ours), winograd=True)
        got = fused(x)
    assert fused.layer1[0].conv1.winograd and hasattr(fused.layer1[0].conv1, "_winograd_weight")  # it ran
    assert not hasattr(fused.layer2[0].conv1, "_winograd_weight")  # stride 2: not this path
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_cpp
def test_transformed_weights_follow_weight_changes():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    conv = blocks.FoldedConv2d(6, 5, 3, padding=1, relu=False, winograd=True).eval()
    x = torch.randn(1, 6, 12, 12, generator=gen)  # 9 tiles, none padded: the path runs
    with torch.no_grad():
        first = conv(x)
        conv.weight.mul_(2)  # in place: the cached U must be recomputed
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(conv(x), first)
    assert hasattr(conv, "_winograd_weight")


@needs_cpp
def test_runs_only_where_it_pays():
    """Few tiles (U, 4× the weights, would cost more to read than the GEMMs save) or outputs padded by more than
    half to whole tiles take the direct path; the result is the same either way."""
    assert winograd.worthwhile(8, 7, 7, 512, 512) and not winograd.worthwhile(4, 7, 7, 512, 512)
    assert winograd.worthwhile(1, 14, 14, 256, 256) and not winograd.worthwhile(2, 4, 4, 256, 256)
    assert not winograd.worthwhile(16, 6, 6, 64, 64) and not winograd.worthwhile(64, 5, 5, 64, 64)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for shape, runs in (((1, 8, 16, 16), True), ((1, 8, 6, 6), False), ((1, 8, 8, 8), False)):
        conv = blocks.FoldedConv2d(8, 8, 3, padding=1, relu=True, winograd=True).eval()
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)),
                                       rtol=1e-4, atol=1e-4)
        assert hasattr(conv, "_winograd_weight") == runs, shape


@needs_cpp
def test_falls_back_where_it_does_not_apply():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    conv = blocks.FoldedConv2d(4, 4, 3, padding=1, relu=True, winograd=True).eval()
    x = torch.randn(2, 4, 8, 8, generator=gen)
    want = torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1) + 1.0)
    with torch.no_grad():
        # a residual that broadcasts is not read in place by the output pass: the general path adds it
        torch.testing.assert_close(conv(x, torch.ones(2, 4, 1, 1)), want, rtol=1e-5, atol=1e-5)
        assert not hasattr(conv, "_winograd_weight")
    # with autograd the convolution stays differentiable
    xg = x.clone().requires_grad_()
    conv(xg).sum().backward()
    assert xg.grad is not None and not hasattr(conv, "_winograd_weight")
    with torch.no_grad(), pytest.raises(RuntimeError):  # wrong input channels: the convolution's own error
        conv(torch.randn(2, 5, 8, 8))
    assert not winograd.applies(x.half(), conv.weight.half(), (1, 1), (1, 1), (1, 1), 1)
    assert not winograd.applies(x, conv.weight, (2, 2), (1, 1), (1, 1), 1)
    assert not winograd.applies(torch.empty(0, 4, 8, 8), conv.weight, (1, 1), (1, 1), (1, 1), 1)


@needs_cpp
def test_threads_get_their_own_workspace():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    problems = [_problem(2, 24, 24, 15, 15, (1, 1), torch.float64, True, gen) for _ in range(4)]
    results, errors = [None] * 4, []

    def run(i):
        try:
            x, wt, b, r = problems[i]
            u = winograd.transform_weight(wt)
            for _ in range(5):
                results[i] = winograd.conv3x3(x, u, b, r, (1, 1), True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (x, wt, b, r), got in zip(problems, results):
        torch.testing.assert_close(got, _reference(x, wt, b, r, (1, 1), True), rtol=1e-11, atol=1e-11)
