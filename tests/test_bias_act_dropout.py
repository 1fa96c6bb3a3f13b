"""bias_act with ReLU / identity and Philox dropout (dlcore/ops/bias_gelu.py), the dropout of issue 3: every
backend against float64 with the mask philox_keep names, forward and backward; dlcore.nn.Dropout and
LinearReLUDropout as drop-ins; identity in eval and at p = 0; reproducible under torch.manual_seed; bad input."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore.functional import bias_act, dropout, linear_act
from dlcore.nn import Dropout, LinearReLUDropout
from dlcore.ops import bias_gelu as ops
from dlcore.ops.attention import philox_keep
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
CASES = [(b, d, t) for t in (torch.float32, torch.bfloat16) for b, d in backend_device_pairs(ops.FORWARD, t)]


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("rows,cols,p", [(1, 1, 0.0), (7, 129, 0.1), (65, 1030, 0.5), (3, 17, 1.0)])
def test_matches_float64_with_the_philox_mask(backend, device, dtype, activation, rows, cols, p):
    gen = torch.Generator().manual_seed(SEED + rows + cols)
    x = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 2).to(dtype).double()  # representable
    b = torch.randn(cols, generator=gen, dtype=torch.float64)
    gy = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype).double()
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    keep = philox_keep(seed, 1, 1, rows, cols, p)[0, 0] if p > 0 else torch.ones(rows, cols, dtype=torch.bool)
    scale = 0.0 if p == 1 else 1 / (1 - p)
    code = ops.ACTIVATIONS[activation]

    xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
    u = xr + br
    want = (u.relu() if activation == "relu" else u) * keep * scale
    grads_want = torch.autograd.grad(want, (xr, br), gy)
    xi, bi = x.to(device, dtype).requires_grad_(), b.to(device, torch.float32).requires_grad_()
    with dlcore.use_backend(backend):
        got = ops.bias_gelu_op(xi, bi, code, p, seed)
        gx, gb = torch.autograd.grad(got, (xi, bi), gy.to(device, dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert bool((got.detach().cpu()[~keep] == 0).all()) and bool((gx.cpu()[~keep] == 0).all())
    assert (got.double().cpu() - want).abs().max().item() <= tol * (1 + want.abs().max().item())
    assert (gx.double().cpu() - grads_want[0]).abs().max().item() <= tol * (1 + grads_want[0].abs().max().item())
    assert (gb.double().cpu() - grads_want[1]).abs().max().item() <= tol * (1 + gy.abs().sum(0).max().item())


def test_dropout_rate_seeding_eval_and_p0():
    x = torch.randn(512, 256, requires_grad=True)
    torch.manual_seed(5)
    a = dropout(x, 0.3)
    torch.manual_seed(5)
    b = dropout(x, 0.3)
    assert torch.equal(a, b)
    assert abs((a != 0).float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(a[a != 0].detach(), (x / 0.7)[a != 0].detach())
    (g,) = torch.autograd.grad(a.sum(), x)
    assert torch.equal(g != 0, a != 0)  # backward regenerates the same mask
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x  # exactly the identity


@pytest.mark.parametrize("backend,device", backend_device_pairs(ops.FORWARD, torch.float32))
def test_inplace_dropout_writes_its_input(backend, device):
    """F.dropout's inplace=True: the result is written into the input (returned), the same values and gradient as
    the out-of-place call with the same seed; the kept input is never read in backward (the mask is regenerated),
    so autograd accepts the overwrite; a leaf that requires grad is refused as torch refuses it; the module too."""
    base = torch.randn(129, 7, dtype=torch.float32, device=device, requires_grad=True)
    with dlcore.use_backend(backend):
        torch.manual_seed(11)
        want = dropout(base * 2, 0.4)
        (g_want,) = torch.autograd.grad(want.sum(), base)
        h = base * 2
        torch.manual_seed(11)
        got = dropout(h, 0.4, True, True)
        assert got is h
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (g_got,) = torch.autograd.grad((got * 1.0).sum(), base)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="leaf Variable"):
            dropout(base, 0.4, True, True)
        module_in = base.detach().clone()
        torch.manual_seed(11)
        assert Dropout(0.4, inplace=True)(module_in) is module_in
        torch.testing.assert_close(module_in, want.detach() / 2, rtol=0, atol=0)
        kept = base.detach().clone()
        assert dropout(kept, 0.4, False, True) is kept  # eval: the identity, nothing written


def test_modules_are_drop_ins():
    torch.manual_seed(0)
    stock = torch.nn.Linear(20, 30)
    fused = LinearReLUDropout(20, 30, p=0.25)
    assert fused.state_dict().keys() == stock.state_dict().keys()
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(8, 20)
    fused.eval()
    torch.testing.assert_close(fused(x), F.relu(stock(x)))
    fused.train()
    y = fused(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], (F.relu(stock(x)) / 0.75)[kept])
    drop = Dropout(0.5)
    assert drop.eval()(x) is x
    assert linear_act(x, stock.weight, stock.bias, "identity").shape == (8, 30)


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="activation must be one of"):
        bias_act(x, None, "tanh")
    with pytest.raises(ValueError, match="dropout_p"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match="dropout probability"):
        LinearReLUDropout(4, 4, p=-0.1)
    with pytest.raises(TypeError, match="input"):
        dropout(torch.ones(3, dtype=torch.int64), 0.5)
    # empty inputs, including an empty last dim: torch's result (an empty tensor), not a reshape error
    for shape in [(3, 0), (0, 5), (2, 0, 4)]:
        empty = torch.randn(shape)
        assert dropout(empty, 0.5).shape == shape and bias_act(empty, torch.randn(shape[-1]), "gelu").shape == shape


def _autograd_nodes(t):
    """Names of every node of t's autograd graph."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names


@pytest.mark.skipif(getattr(dlcore._ext.cpu, "simd", None) != "avx512", reason="the skinny GEMM needs AVX-512")
@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((7,), 17, 5), ((2, 8), 1000, 129), ((64,), 15, 33),
                                      ((3, 11), 300, 7)])
def test_skinny_linear_matches_float64(lead, k, n, monkeypatch):
    """linear_act's CPU matmul for ≤ 64 rows (csrc/cpu/skinny_linear.cpp: 4×4 tiles, masked K tail, tail tiles)
    against float64, output and every gradient; more rows, fewer multiply-adds than SKINNY_MIN_MACS (the
    threshold is lowered here so the tails are tested at small sizes) and use_backend("reference") stay on torch's
    GEMM."""
    gen = torch.Generator().manual_seed(SEED + k + n)
    x = torch.randn(*lead, k, generator=gen, requires_grad=True)
    w = torch.randn(n, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True)
    if x.numel() * n < ops.SKINNY_MIN_MACS:
        assert "_SkinnyLinearBackward" not in _autograd_nodes(linear_act(x, w, b))
    monkeypatch.setattr(ops, "SKINNY_MIN_MACS", 0)
    monkeypatch.setattr(ops, "SKINNY_HOST", True)  # (the kernel is tested on every host; it runs on AMD ones)
    y = linear_act(x, w, b, "identity")
    assert "_SkinnyLinearBackward" in _autograd_nodes(y), "the skinny GEMM did not run"
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.linear(*leaves)
    ref.backward(dy.double())
    scale = k ** 0.5 * 1e-6  # fp32 accumulation over k terms
    torch.testing.assert_close(y.double(), ref, atol=10 * scale, rtol=1e-5)
    for got, want in zip((x.grad, w.grad, b.grad), (t.grad for t in leaves)):
        torch.testing.assert_close(got.double(), want, atol=10 * scale * max(1, n ** 0.5), rtol=1e-5)
    # second derivatives (create_graph=True takes torch's matmuls): once_differentiable had made them raise only
    # while dy required grad, and silently dropped dx's dependence on W otherwise
    for inputs, linear in (((x, w, b), lambda *a: linear_act(*a, "identity")), (leaves, F.linear)):
        gx, = torch.autograd.grad((linear(*inputs) * dy.to(inputs[0].dtype)).sum(), inputs[0], create_graph=True)
        second = torch.autograd.grad((gx * gx).sum(), inputs[1])[0]
        if linear is F.linear:
            torch.testing.assert_close(ours.double(), second, atol=1e-5 * float(second.abs().max()), rtol=1e-4)
        ours = second
    with dlcore.use_backend("reference"):
        assert "_SkinnyLinearBackward" not in _autograd_nodes(linear_act(x, w, b))
    many = torch.randn(65, k)
    assert "_SkinnyLinearBackward" not in _autograd_nodes(linear_act(many, w, b))


@pytest.mark.parametrize("lead,k,n,bias", [((1,), 768, 3072, True), ((3, 5), 512, 600, False), ((1,), 16, 8, True),
                                           ((100,), 300, 1000, True)])
def test_linear_matches_float64(lead, k, n, bias):
    """dlcore.functional.linear / dlcore.nn.Linear: F.linear's result and gradients, through the skinny GEMM where
    it applies (few rows of fp32, enough multiply-adds, AVX-512) and torch's GEMM elsewhere."""
    from dlcore.functional import linear
    from dlcore.nn import Linear

    gen = torch.Generator().manual_seed(SEED + k + n)
    x = torch.randn(*lead, k, generator=gen, requires_grad=True)
    layer = Linear(k, n, bias=bias)
    assert list(layer.state_dict()) == list(torch.nn.Linear(k, n, bias=bias).state_dict())
    y = layer(x)
    skinny = (getattr(dlcore._ext.cpu, "simd", None) == "avx512" and x.numel() <= ops.SKINNY_MAX_ROWS * k
              and x.numel() * n >= ops.SKINNY_MIN_MACS and ops.SKINNY_HOST)
    assert ("_SkinnyLinearBackward" in _autograd_nodes(y)) == skinny
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.weight)]
    b64 = layer.bias.detach().double().requires_grad_() if bias else None
    ref = F.linear(*leaves, b64)
    ref.backward(dy.double())
    scale = k ** 0.5 * 1e-6
    torch.testing.assert_close(y.double(), ref, atol=10 * scale, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), leaves[0].grad, atol=10 * scale * n ** 0.5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad.double(), leaves[1].grad, atol=10 * scale * n ** 0.5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), b64.grad, atol=1e-4, rtol=1e-5)
        with pytest.raises(RuntimeError, match="same dtype"):  # torch's error, not a silent promotion to fp64
            linear(x, layer.weight, layer.bias.double())
    torch.testing.assert_close(linear(x.double(), layer.weight.double()), F.linear(x.double(), layer.weight.double()))
    with pytest.raises(RuntimeError):  # mismatched shapes: torch's own error
        linear(x, torch.randn(n, k + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch's autocast rule: the linear runs (and returns) bf16
        assert layer(x).dtype == torch.nn.functional.linear(x, layer.weight, layer.bias).dtype == torch.bfloat16


def test_skinny_gemm_runs_where_the_host_rule_says(monkeypatch):
    """SKINNY_HOST: DLCORE_SKINNY_GEMM=1/0 forces it; otherwise AMD CPUs only (MKL beats it on Intel ones)."""
    monkeypatch.setenv("DLCORE_SKINNY_GEMM", "1")
    assert ops._skinny_host()
    monkeypatch.setenv("DLCORE_SKINNY_GEMM", "0")
    assert not ops._skinny_host()
    monkeypatch.delenv("DLCORE_SKINNY_GEMM")
    try:
        with open("/proc/cpuinfo") as f:
            amd = "AuthenticAMD" in f.read()
    except OSError:
        amd = False
    assert ops._skinny_host() == amd
    x, w = torch.randn(2, 1024), torch.randn(512, 1024)
    for host in (False, True):
        monkeypatch.setattr(ops, "SKINNY_HOST", host)
        avx512 = getattr(dlcore._ext.cpu, "simd", None) == "avx512"
        assert ("_SkinnyLinearBackward" in _autograd_nodes(linear_act(x.requires_grad_(), w))) == (host and avx512)
