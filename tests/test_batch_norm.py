"""batch_norm_act (dlcore/ops/batch_norm.py) and the layers built on it: every backend against F.batch_norm in
float64 on fresh inputs with odd shapes, NCHW / channels_last / 2-D / 3-D, each activation, with and without the
residual, training and eval, every gradient, the running statistics; low-precision storage against the fp32
reference's own error; gradcheck; opcheck; torch.compile; the modules; bad input."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore import blocks
from dlcore.functional import batch_norm_act
from dlcore.ops import batch_norm as bn_ops
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
# (shape, channels_last): odd sizes, a 1-wide channel count, 2-D (BatchNorm1d) and 3-D inputs, >64 channels
SHAPES = [((4, 7, 5, 3), False), ((4, 7, 5, 3), True), ((9, 5), False), ((3, 6, 10), False), ((2, 129, 3, 3), True),
          ((1, 1, 7, 1), False), ((1000, 3), False), ((2, 16, 33, 31), True)]
ACTS = ["relu", "leaky_relu", "identity"]
CASES32 = backend_device_pairs(bn_ops.STATS, torch.float32)


def _reference(x, rm, rv, w, b, training, r, act, momentum=0.1):
    z = F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
    z = z if r is None else z + r
    return F.relu(z) if act == "relu" else F.leaky_relu(z, 0.2) if act == "leaky_relu" else z


def _inputs(shape, channels_last, gen, residual):
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3  # a mean far from 0: cancellation shows
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(c, generator=gen, dtype=torch.float64)
    b = torch.randn(c, generator=gen, dtype=torch.float64)
    r = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
    rm = torch.randn(c, generator=gen, dtype=torch.float64)
    rv = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    return x, w, b, r, rm, rv


@pytest.mark.parametrize("backend,device", CASES32)
@pytest.mark.parametrize("shape,channels_last", SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training,residual", [(True, False), (True, True), (False, True)])
def test_fp32_matches_float64_reference(backend, device, shape, channels_last, act, training, residual):
    gen = torch.Generator().manual_seed(SEED + sum(shape) + ACTS.index(act))
    x, w, b, r, rm, rv = _inputs(shape, channels_last, gen, residual)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    if act != "identity":  # no upstream gradient within 1e-3 of the kink, where fp32 rounding may pick either side
        z = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5) + (r if residual else 0)
        dy = torch.where(z.abs() < 1e-3, 0.0, dy)
    leaves = [t.clone().requires_grad_() for t in (x, w, b) + ((r,) if residual else ())]
    stats = [rm.clone(), rv.clone()]
    y_ref = _reference(leaves[0], *stats, leaves[1], leaves[2], training, leaves[3] if residual else None, act)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)

    ours = [t.to(device, torch.float32).requires_grad_() for t in (x, w, b) + ((r,) if residual else ())]
    ours_stats = [rm.to(device, torch.float32), rv.to(device, torch.float32)]
    with dlcore.use_backend(backend):
        y = batch_norm_act(ours[0], *ours_stats, ours[1], ours[2], training, residual=ours[3] if residual else None,
                           activation=act, negative_slope=0.2)
        grads = torch.autograd.grad(y, ours, dy.to(device, torch.float32))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "the output keeps the input's layout"
    tol = 2e-5 * (1 + y_ref.abs().max().item())
    assert (y.double().cpu() - y_ref).abs().max().item() <= tol
    for got, want, name in zip(grads, grads_ref, ("input", "weight", "bias", "residual")):
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= 5e-5 * (1 + want.abs().max().item()), f"grad {name}: {err}"
    for got, want in zip(ours_stats, stats):  # running statistics: updated in training, untouched in eval
        assert (got.double().cpu() - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())


LOW = [(b, d, t) for t in (torch.bfloat16, torch.float16) for b, d in backend_device_pairs(bn_ops.STATS, t)
       if b != "reference"]


@pytest.mark.parametrize("backend,device,dtype", LOW)
@pytest.mark.parametrize("shape,channels_last", [((4, 7, 5, 3), True), ((3, 33, 17), False)])
def test_low_precision_within_twice_the_reference_error(backend, device, dtype, shape, channels_last):
    """bf16/fp16 storage: error against float64 at most 2× (plus an ulp) that of torch's own low-precision BN."""
    gen = torch.Generator().manual_seed(SEED)
    x, w, b, r, rm, rv = _inputs(shape, channels_last, gen, True)
    want = _reference(x, rm.clone(), rv.clone(), w, b, True, r, "relu")
    low = [t.to(device, dtype) for t in (x, r)]
    torch_low = _reference(low[0], rm.to(device, dtype), rv.to(device, dtype), w.to(device, dtype),
                           b.to(device, dtype), True, low[1], "relu")
    with dlcore.use_backend(backend):
        got = batch_norm_act(low[0], rm.float().to(device), rv.float().to(device), w.float().to(device),
                             b.float().to(device), True, residual=low[1])
    ulp = torch.finfo(dtype).eps * (1 + want.abs().max().item())
    ref_err = (torch_low.double().cpu() - want).abs().max().item()
    assert (got.double().cpu() - want).abs().max().item() <= 2 * ref_err + ulp


def test_gradcheck_float64_every_input():
    gen = torch.Generator().manual_seed(SEED)
    x, w, b, r, rm, rv = _inputs((3, 4, 3, 2), False, gen, True)
    for training in (True, False):
        def fn(x, w, b, r, training=training):
            return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, residual=r, activation="leaky_relu",
                                  negative_slope=0.3)
        assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b, r)))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False])
def test_second_derivative_gradgradcheck_and_a_gradient_penalty(act, training):
    """A backward with create_graph=True (WGAN-GP / R1 penalties on a DCGAN discriminator, double backprop) takes
    the differentiable formula; the kernels' backward has no second derivative and made torch raise. gradgradcheck
    in float64 with and without the affine weight and the residual; then a gradient penalty through the batch
    norm against F.batch_norm's, every gradient."""
    gen = torch.Generator().manual_seed(SEED)
    x, w, b, r, rm, rv = _inputs((3, 4, 3, 2), False, gen, True)
    for weight, residual in ((w, r), (None, None)):
        def fn(*ts):
            x, w, b, r = ts if weight is not None else (ts[0], None, ts[1], None)
            return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, residual=r, activation=act,
                                  negative_slope=0.3)
        args = (x, w, b, r) if weight is not None else (x, b)
        assert torch.autograd.gradgradcheck(fn, tuple(t.detach().requires_grad_() for t in args))
    grads = []
    for op in (batch_norm_act, lambda *a, **k: _reference(*a[:6], k["residual"], act)):  # (slope 0.2 in both)
        ins = [t.detach().clone().requires_grad_() for t in (x, w, b, r)]
        y = op(ins[0], rm.clone(), rv.clone(), ins[1], ins[2], training, residual=ins[3], activation=act,
               negative_slope=0.2)
        dx, = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(), ins[0],
                                  create_graph=True)
        (dx.flatten(1).norm(dim=1) - 1).square().mean().backward()
        grads.append([torch.zeros_like(t) if t.grad is None else t.grad for t in ins])  # (None: no dependence)
    for ours, want in zip(*grads):
        torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)


def test_running_statistics_as_torch_including_cumulative_momentum():
    gen = torch.Generator().manual_seed(SEED)
    ours, stock = blocks.BatchNorm2d(5, momentum=None), torch.nn.BatchNorm2d(5, momentum=None)
    for _ in range(3):
        x = torch.randn(4, 5, 3, 3, generator=gen)
        torch.testing.assert_close(ours(x), stock(x), rtol=1e-5, atol=1e-5)
    for k, v in stock.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == 3


def test_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 5).requires_grad_()
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    r = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(bn_ops.batch_norm_act_op, (x, r, w, b, None, None, True, 1e-5, 1, 0.0))
    torch.library.opcheck(bn_ops.batch_norm_act_op, (x, None, w, b, torch.zeros(3), torch.ones(3), False, 1e-5, 2,
                                                     0.2))
    fn = torch.compile(lambda x, w, b, r: batch_norm_act(x, None, None, w, b, True, residual=r).sum(),
                       fullgraph=True)
    torch.testing.assert_close(fn(x, w, b, r), F.relu(F.batch_norm(x, None, None, w, b, True) + r).sum())


@pytest.mark.parametrize("cls,act", [(blocks.BatchNorm2dReLU, "relu"), (blocks.BatchNorm2dLeakyReLU, "leaky"),
                                     (blocks.BatchNorm1dReLU, "relu"), (blocks.BatchNorm2d, None)])
def test_modules_are_drop_ins(cls, act):
    base = torch.nn.BatchNorm1d if "1d" in cls.__name__ else torch.nn.BatchNorm2d
    shape = (6, 4) if base is torch.nn.BatchNorm1d else (3, 4, 5, 5)
    stock, ours = base(4), cls(4, negative_slope=0.2)
    assert ours.state_dict().keys() == stock.state_dict().keys()
    ours.load_state_dict(stock.state_dict())
    activation = {"relu": F.relu, "leaky": lambda z: F.leaky_relu(z, 0.2), None: lambda z: z}[act]
    for mode in (True, False):
        stock.train(mode), ours.train(mode)
        x = torch.randn(shape)
        torch.testing.assert_close(ours(x), activation(stock(x)), rtol=1e-5, atol=1e-5)
    shared = cls.from_module(stock, negative_slope=0.2)
    assert shared.weight is stock.weight and shared.running_mean is stock.running_mean


def test_bad_input():
    x = torch.randn(2, 3, 4, 4)
    w = torch.ones(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm_act(torch.randn(1, 3, 1, 1), None, None, w, None, True)
    with pytest.raises(ValueError, match=r"input has 3 channels \(dim 1\) but weight has shape \(4,\)"):
        batch_norm_act(x, None, None, torch.ones(4), None, True)
    with pytest.raises(ValueError, match="input has 3 channels"):  # a module built for another channel count
        blocks.BatchNorm2dReLU(4).eval()(x)
    with pytest.raises(ValueError, match="residual must have shape"):
        batch_norm_act(x, None, None, w, None, True, residual=torch.randn(2, 3, 4, 5))
    with pytest.raises(TypeError, match="residual is torch.float64"):
        batch_norm_act(x, None, None, w, None, True, residual=x.double())
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        batch_norm_act(x, None, None, w, None, False)
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        batch_norm_act(x, None, None, w, None, True, activation="leaky_relu", negative_slope=-0.1)
    with pytest.raises(ValueError, match="activation must be one of"):
        batch_norm_act(x, None, None, w, None, True, activation="gelu")
    with pytest.raises(TypeError, match="floating-point"):
        batch_norm_act(x.long(), None, None, w, None, True)
    for training in (False, True):  # an empty batch: torch's empty result, the statistics untouched
        stats, tracked = (torch.zeros(3), torch.ones(3)), torch.tensor(0)
        empty = batch_norm_act(torch.randn(0, 3, 2, 2), *stats, w, None, training, num_batches_tracked=tracked)
        assert empty.shape == (0, 3, 2, 2) and torch.equal(stats[0], torch.zeros(3)) and int(tracked) == training
    with pytest.raises(ValueError, match="expected 4D input"):  # torch's own module check
        blocks.BatchNorm2dReLU(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="at least 2 dims"):
        batch_norm_act(torch.randn(5), None, None, None, None, True)
    # running statistics that cannot be written in place: refused before anything (num_batches_tracked) moves
    tracked = torch.tensor(3)
    with pytest.raises(ValueError, match="running_var is updated in place and must not be an expanded tensor"):
        batch_norm_act(x, torch.zeros(3), torch.ones(1).expand(3), w, None, True, num_batches_tracked=tracked)
    assert tracked.item() == 3
