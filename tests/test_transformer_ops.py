"""The transformer helper ops of issue 5 — fused (residual +) LayerNorm, bias + GELU, softmax cross-entropy and
the fused linear + cross-entropy: every backend against float64 on fresh random inputs with odd shapes, every
gradient, fp32 and the low-precision dtypes (within 2× of stock torch's own error in that dtype); gradcheck,
opcheck, torch.compile, bad input."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore.functional import bias_gelu, cross_entropy, layer_norm, linear_cross_entropy
from dlcore.ops import bias_gelu as bias_gelu_mod
from dlcore.ops import cross_entropy as ce_mod
from dlcore.ops import layer_norm as ln_mod
from dlcore.testing import backend_device_pairs, max_error

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
LOW = (torch.bfloat16, torch.float16)


def _gen(*salt) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + hash(salt) % 10007)


def _representable(dtype, *tensors):
    """The float64 tensors rounded to `dtype` (and back), so that the float64 oracle and every low-precision run
    see the same inputs and the comparison measures each computation's own error."""
    return [t.to(dtype).double() if dtype in LOW else t for t in tensors]


def _cases(op):
    return [(b, d, t) for t in (torch.float32, torch.float64, *LOW) for b, d in backend_device_pairs(op, t)]


def _check(got, want64, stock_low, dtype, what, fp32_tol=3e-5, extra_roundings=0):
    """fp32/fp64: relative to the float64 result; bf16/fp16: within 2× stock torch's own error in that dtype (plus
    `extra_roundings` half-ulps of the largest value, for a result that is rounded to the dtype more times)."""
    scale = 1 + want64.abs().max().item()
    err = max_error(got.cpu(), want64)
    if dtype in LOW:
        half_ulp = torch.finfo(dtype).eps / 2 * want64.abs().max().item()
        allowed = 2 * max_error(stock_low.cpu(), want64) + 1e-3 * scale + extra_roundings * half_ulp
    else:
        allowed = (1e-10 if dtype == torch.float64 else fp32_tol) * scale
    assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


# ---------------------------------------------------------------------------------------------------- layer norm
@pytest.mark.parametrize("backend,device,dtype", _cases(ln_mod.FORWARD))
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 129), (33, 768), (3, 1000)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64(backend, device, dtype, rows, cols, residual, affine):
    gen = _gen("ln", rows, cols, residual, affine)
    x, r = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3 + 1 for _ in range(2))
    w, b = (torch.randn(cols, generator=gen, dtype=torch.float64) for _ in range(2))
    gy, gh = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) for _ in range(2))
    x, r, gy, gh = _representable(dtype, x, r, gy, gh)

    def run(dt, dev, fn):
        ins = [t.to(dev, dt).requires_grad_() for t in (x, r)]
        params = [t.to(dev, torch.float64 if dt == torch.float64 else torch.float32).requires_grad_() for t in (w, b)]
        y, h = fn(ins, params)
        outs = [y] + ([h] if residual else [])
        grads = torch.autograd.grad(outs, ins[:1 + residual] + (params if affine else []),
                                    [gy.to(dev, dt)] + ([gh.to(dev, dt)] if residual else []))
        return outs + list(grads)

    def stock(ins, params):
        h = ins[0] + ins[1] if residual else ins[0]
        return F.layer_norm(h, (cols,), *(p.to(h.dtype) for p in params) if affine else (None, None)), h

    def ours(ins, params):
        out = layer_norm(ins[0], cols, *(params if affine else (None, None)), residual=ins[1] if residual else None)
        return out if residual else (out, None)

    want = run(torch.float64, "cpu", stock)
    low = run(dtype, device, stock) if dtype in LOW else want
    with dlcore.use_backend(backend):
        got = run(dtype, device, ours)
    for g, w64, s, name in zip(got, want, low, ["y", "h", "dx", "dres", "dw", "db"] if residual else
                               ["y", "dx", "dw", "db"]):
        _check(g, w64, s, dtype, f"{backend} {name}")


def test_layer_norm_gradcheck_float64_and_opcheck():
    gen = _gen("lngc")
    x, r = (torch.randn(5, 11, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: layer_norm(a[0], 11, a[2], a[3], residual=a[1]), (x, r, w, b))
    for xs, rs in ((x.float().detach(), r.float().detach()), (x.float().detach(), None)):
        torch.library.opcheck(ln_mod.layer_norm_op, (xs, rs, w.float().detach(), None, 1e-5))


def test_layer_norm_second_derivative():
    """create_graph=True (a gradient penalty, double backprop) takes autograd of the normalisation with the
    statistics recomputed from h = x (+ residual): first derivatives equal the kernels', gradgradcheck holds with
    and without the affine parameters and the residual (whose h output is differentiated too)."""
    gen = _gen("ln-2nd")
    x, r = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    w, b = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    for args in ((x, w, b, r), (x,), (x, None, None, r)):
        def fn(x, w=None, b=None, r=None):
            out = layer_norm(x, 6, w, b, residual=r)
            return out if r is None else out[0] * 2 + out[1] ** 2  # both outputs in the derivatives
        ins = tuple(None if t is None else t.clone().requires_grad_() for t in args)
        used = [t for t in ins if t is not None]
        dy = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        first = torch.autograd.grad(fn(*ins), used, dy)
        again = torch.autograd.grad(fn(*ins), used, dy, create_graph=True)
        for a, c in zip(first, again):
            torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-10)
        assert torch.autograd.gradgradcheck(lambda *t: fn(*(next(iter_) if a is not None else None
                                                               for iter_ in [iter(t)] for a in args)), used)


def test_layer_norm_module_and_compile():
    ln = dlcore.nn.LayerNorm(24)
    ref = torch.nn.LayerNorm(24)
    ln.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 24)
    assert max_error(ln(x), ref(x)) < 1e-5
    y, h = ln(x, residual=x)
    assert max_error(h, 2 * x) == 0 and max_error(y, ref(2 * x)) < 1e-5
    compiled = torch.compile(lambda a, b: layer_norm(a, 24, residual=b), fullgraph=True, backend="eager")
    assert max_error(compiled(x, x)[0], F.layer_norm(2 * x, (24,))) < 1e-5


def test_layer_norm_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="normalized_shape"):
        layer_norm(x, 7)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, 8, torch.ones(7))
    with pytest.raises(ValueError, match="residual"):
        layer_norm(x, 8, residual=torch.randn(4, 7))
    with pytest.raises(TypeError, match="input"):
        layer_norm(torch.ones(4, 8, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, 8, eps=float("nan"))
    assert layer_norm(torch.randn(0, 8), 8).shape == (0, 8)
    assert max_error(layer_norm(x.t(), 4), F.layer_norm(x.t(), (4,))) < 1e-5  # non-contiguous input


# ---------------------------------------------------------------------------------------------------- bias + GELU
@pytest.mark.parametrize("backend,device,dtype", _cases(bias_gelu_mod.FORWARD))
@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 129), (65, 1030)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_gelu_matches_float64(backend, device, dtype, rows, cols, approximate, has_bias):
    gen = _gen("bg", rows, cols, approximate, has_bias)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 3
    b = torch.randn(cols, generator=gen, dtype=torch.float64)
    gy = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x, gy = _representable(dtype, x, gy)

    def run(dt, dev, fn):
        xi = x.to(dev, dt).requires_grad_()
        bi = b.to(dev, torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
        y = fn(xi, bi if has_bias else None)
        return [y, *torch.autograd.grad(y, [xi] + ([bi] if has_bias else []), gy.to(dev, dt))]

    def stock(xi, bi):
        return F.gelu(xi + bi.to(xi.dtype) if bi is not None else xi, approximate=approximate)

    want = run(torch.float64, "cpu", stock)
    low = run(dtype, device, stock) if dtype in LOW else want
    with dlcore.use_backend(backend):
        got = run(dtype, device, lambda xi, bi: bias_gelu(xi, bi, approximate))
    for g, w64, s, name in zip(got, want, low, ("y", "dx", "db")):
        _check(g, w64, s, dtype, f"{backend} {name}")


def test_bias_gelu_gradcheck_opcheck_and_bad_input():
    gen = _gen("bggc")
    x = torch.randn(3, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    for approximate in ("none", "tanh"):
        assert torch.autograd.gradcheck(lambda a, c: bias_gelu(a, c, approximate), (x, b))
    torch.library.opcheck(bias_gelu_mod.bias_gelu_op, (x.float().detach(), b.float().detach(), 1, 0.0, 0))
    torch.library.opcheck(bias_gelu_mod.bias_gelu_op, (x.float().detach(), b.float().detach(), 2, 0.3, 123))
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu(x, b, "fast")
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(x, torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="input"):
        bias_gelu(torch.ones(3, 9, dtype=torch.int32))
    assert bias_gelu(torch.randn(0, 9), torch.randn(9)).shape == (0, 9)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "identity"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bias_act_second_derivative(activation, p):
    """create_graph=True (MAML's inner step through a patched Linear + ReLU, gradient penalties) takes autograd of
    the reference forward with the same Philox mask: its first derivatives equal the kernels', and gradgradcheck
    holds, with and without the bias (no bias + identity = plain dropout, whose backward keeps no input)."""
    from dlcore.functional import bias_act

    gen = _gen(f"bias-act-2nd-{activation}-{p}")
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    b = torch.randn(7, generator=gen, dtype=torch.float64)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    for bias in (b, None):
        def fn(x, *bias):
            torch.manual_seed(seed)  # the same dropout mask on every call
            return bias_act(x, *bias, activation=activation, dropout_p=p)

        ins = (x.clone().requires_grad_(), *(() if bias is None else (bias.clone().requires_grad_(),)))
        dy = torch.randn(5, 7, generator=gen, dtype=torch.float64)
        first = torch.autograd.grad(fn(*ins), ins, dy)
        again = torch.autograd.grad(fn(*ins), ins, dy, create_graph=True)
        for a, c in zip(first, again):
            torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradgradcheck(fn, ins)


@pytest.mark.parametrize("backend,device,dtype", [c for c in _cases(bias_gelu_mod.FORWARD) if c[2] != torch.float16])
@pytest.mark.parametrize("rows,cols,p", [(7, 129, 0.1), (65, 1030, 0.5), (3, 17, 1.0)])
def test_bias_gelu_dropout_same_mask_on_every_backend(backend, device, dtype, rows, cols, p):
    """Every backend drops the elements philox_keep names (forward and backward), scaled by 1/(1 − p)."""
    from dlcore.ops.attention import philox_keep

    gen = _gen("bgd", rows, cols, p)
    x = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 2
    b = torch.randn(cols, generator=gen, dtype=torch.float64)
    gy = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x, gy = _representable(dtype, x, gy)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    keep = philox_keep(seed, 1, 1, rows, cols, p)[0, 0]
    scale = 0.0 if p == 1 else 1 / (1 - p)

    def stock(xi, bi):
        return F.gelu(xi + bi.to(xi.dtype), approximate="tanh") * keep.to(xi.dtype) * scale

    def run(dt, dev, fn):
        xi = x.to(dev, dt).requires_grad_()
        bi = b.to(dev, torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()
        y = fn(xi, bi)
        return [y, *torch.autograd.grad(y, [xi, bi], gy.to(dev, dt))]

    want = run(torch.float64, "cpu", stock)
    low = run(dtype, device, stock) if dtype in LOW else want
    with dlcore.use_backend(backend):
        got = run(dtype, device, lambda xi, bi: bias_gelu_mod.bias_gelu_op(xi, bi.to(bias_gelu_mod.math_dtype(
            xi.dtype)), 1, p, seed))
    assert bool((got[0].detach().cpu()[~keep] == 0).all()) and bool((got[1].detach().cpu()[~keep] == 0).all())
    for g, w64, s, name in zip(got, want, low, ("y", "dx", "db")):
        _check(g, w64, s, dtype, f"{backend} {name}")


def test_bias_gelu_dropout_rate_and_seeding():
    x = torch.randn(256, 512)
    torch.manual_seed(3)
    a = bias_gelu(x, None, "tanh", dropout_p=0.25)
    torch.manual_seed(3)
    b = bias_gelu(x, None, "tanh", dropout_p=0.25)
    assert torch.equal(a, b)  # torch.manual_seed reproduces the mask
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01
    assert max_error(bias_gelu(x, None, "tanh", dropout_p=0.25, training=False), F.gelu(x, approximate="tanh")) < 1e-5
    with pytest.raises(ValueError, match="dropout_p"):
        bias_gelu(x, dropout_p=1.5)


# ---------------------------------------------------------------------------------------------------- cross-entropy
def _targets(gen, rows, classes, ignore_every=5):
    t = torch.randint(0, classes, (rows,), generator=gen)
    t[ignore_every - 1::ignore_every] = -100  # every k-th row ignored, never the first (a mean over none is nan)
    return t


@pytest.mark.parametrize("backend,device,dtype", _cases(ce_mod.FORWARD))
@pytest.mark.parametrize("rows,classes", [(1, 1), (7, 129), (33, 5000)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_float64(backend, device, dtype, rows, classes, smoothing, reduction):
    gen = _gen("ce", rows, classes, smoothing, reduction)
    z = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 4
    t = _targets(gen, rows, classes, ignore_every=3)
    g = torch.randn(rows if reduction == "none" else (), generator=gen, dtype=torch.float64)
    z, = _representable(dtype, z)

    def run(dt, dev, fn):
        zi = z.to(dev, dt).requires_grad_()
        loss = fn(zi, t.to(dev))
        return [loss, torch.autograd.grad(loss, zi, g.to(dev, loss.dtype))[0]]

    kw = dict(reduction=reduction, label_smoothing=smoothing)
    want = run(torch.float64, "cpu", lambda zi, ti: F.cross_entropy(zi, ti, **kw))
    low = run(dtype, device, lambda zi, ti: F.cross_entropy(zi, ti, **kw)) if dtype in LOW else want
    with dlcore.use_backend(backend):
        got = run(dtype, device, lambda zi, ti: cross_entropy(zi, ti, **kw))
    for a, w64, s, name in zip(got, want, low, ("loss", "dlogits")):
        _check(a, w64, s, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend,device,dtype", [c for c in _cases(ce_mod.FORWARD) if c[2] != torch.float16])
@pytest.mark.parametrize("rows,hidden,vocab,chunk", [(1, 8, 3, None), (37, 64, 1000, 8), (130, 48, 4099, None)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_float64(backend, device, dtype, rows, hidden, vocab, chunk, smoothing, bias):
    gen = _gen("lce", rows, hidden, vocab, smoothing, bias)
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5 * 3
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    t = _targets(gen, rows, vocab, ignore_every=4)
    g = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    x, w, b = _representable(dtype, x, w, b)

    def run(dt, dev, fn):
        ins = [u.to(dev, dt).requires_grad_() for u in (x, w, b)]
        loss = fn(ins[0], ins[1], ins[2] if bias else None, t.to(dev))
        return [loss, *torch.autograd.grad(loss, ins[:2 + bias], g.to(dev, loss.dtype))]

    kw = dict(label_smoothing=smoothing)
    stock = lambda xi, wi, bi, ti: F.cross_entropy(F.linear(xi, wi, bi), ti, **kw)  # noqa: E731
    want = run(torch.float64, "cpu", stock)
    low = run(dtype, device, stock) if dtype in LOW else want
    with dlcore.use_backend(backend):
        got = run(dtype, device, lambda xi, wi, bi, ti: linear_cross_entropy(xi, wi, ti, bi, chunk_rows=chunk, **kw))
    # the gradients are formed in forward (∂loss/∂logits rounded to the dtype) and scaled by the incoming gradient
    # in backward: one rounding more than stock autograd makes
    for a, w64, s, name in zip(got, want, low, ("loss", "dx", "dW", "db")):
        _check(a, w64, s, dtype, f"{backend} {name}", fp32_tol=1e-4, extra_roundings=2)


# K-dimensional logits, class weights, probability targets: forms of F.cross_entropy built on the same kernel
CE_FORMS = [  # (logits shape, target kind, class weights, smoothing, reduction)
    ((3, 7, 5), "index", False, 0.0, "none"), ((2, 129, 3, 2), "index", True, 0.1, "mean"),
    ((7, 129), "index", True, 0.0, "mean"), ((7, 129), "index", True, 0.2, "sum"), ((5, 9), "index", True, 0.1, "none"),
    ((9,), "index", True, 0.1, "mean"), ((7, 129), "probs", False, 0.0, "mean"), ((3, 17, 4), "probs", True, 0.1, "none"),
    ((1, 1000), "probs", True, 0.0, "sum"), ((6,), "probs", False, 0.3, "mean")]


@pytest.mark.parametrize("backend,device,dtype", _cases(ce_mod.FORWARD))
@pytest.mark.parametrize("shape,kind,weighted,smoothing,reduction", CE_FORMS)
def test_cross_entropy_torch_forms_match_float64(backend, device, dtype, shape, kind, weighted, smoothing, reduction):
    gen = _gen("ce-forms", shape, kind, weighted, smoothing, reduction)
    z = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    classes = shape[1] if len(shape) > 1 else shape[0]
    rows = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    if kind == "probs":
        t = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, 1 if len(shape) > 1 else 0)
    else:
        t = torch.randint(0, classes, rows, generator=gen)
        if t.dim():
            t.view(-1)[::3] = -100
    cw = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.2 if weighted else None
    loss_shape = rows if reduction == "none" else ()
    g = torch.randn(loss_shape, generator=gen, dtype=torch.float64)
    z, = _representable(dtype, z)

    def run(dt, dev, fn):
        zi = z.to(dev, dt).requires_grad_()
        ti = t.to(dev, dt) if kind == "probs" else t.to(dev)
        loss = fn(zi, ti, None if cw is None else cw.to(dev, dt))
        assert loss.shape == loss_shape
        return [loss, torch.autograd.grad(loss, zi, g.to(dev, loss.dtype))[0]]

    kw = dict(reduction=reduction, label_smoothing=smoothing)
    want = run(torch.float64, "cpu", lambda zi, ti, wi: F.cross_entropy(zi, ti, wi, **kw))
    low = run(dtype, device, lambda zi, ti, wi: F.cross_entropy(zi, ti, wi, **kw)) if dtype in LOW else want
    with dlcore.use_backend(backend):
        got = run(dtype, device, lambda zi, ti, wi: cross_entropy(zi, ti, wi, **kw))
    for a, w64, s, name in zip(got, want, low, ("loss", "dlogits")):
        _check(a, w64, s, dtype, f"{backend} {name}")


@pytest.mark.parametrize("backend,device,dtype", [c for c in _cases(ce_mod.FORWARD) if c[2] != torch.float16])
def test_cross_entropy_ignore_index_anywhere(backend, device, dtype):
    """ignore_index may be any integer, a class in [0, C) or one past it (torch allows both): its rows drop out of
    the loss, the 'mean' denominator and the gradient, with class weights and smoothing too."""
    gen = _gen("ce-ignore", dtype)
    classes = 7
    z, = _representable(dtype, torch.randn(9, classes, generator=gen, dtype=torch.float64) * 3)
    cw = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.2
    for ignore_index in (-100, 2, classes, classes + 5):
        t = torch.randint(0, classes, (9,), generator=gen)
        t[::3] = ignore_index
        for kw in (dict(), dict(weight=cw, label_smoothing=0.1), dict(label_smoothing=0.2, reduction="sum")):
            def run(dt, fn):
                zi = z.to(device, dt).requires_grad_()
                args = {k: (v.to(device, dt) if k == "weight" else v) for k, v in kw.items()}
                loss = fn(zi, t.to(device), ignore_index=ignore_index, **args)
                return [loss, torch.autograd.grad(loss, zi)[0]]
            want = run(torch.float64, F.cross_entropy)
            low = run(dtype, F.cross_entropy) if dtype in LOW else want
            with dlcore.use_backend(backend):
                got = run(dtype, cross_entropy)
            for a, w64, lo, name in zip(got, want, low, ("loss", "dlogits")):
                _check(a, w64, lo, dtype, f"{backend} ignore_index={ignore_index} {kw.keys()} {name}")


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_cross_entropy_loss_module_is_a_drop_in():
    """dlcore.nn.CrossEntropyLoss takes nn.CrossEntropyLoss's arguments (class weights included) and state."""
    gen = _gen("ce-module")
    z = torch.randn(4, 6, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 6, (4, 3), generator=gen)
    cw = torch.rand(6, generator=gen, dtype=torch.float64)
    for kw in (dict(weight=cw, label_smoothing=0.1), dict(ignore_index=2, reduction="sum"), dict(size_average=False)):
        ours, stock = dlcore.nn.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
        assert ours.state_dict().keys() == stock.state_dict().keys()
        assert torch.allclose(ours(z, t), stock(z, t), atol=1e-12)
    assert torch.allclose(cross_entropy(z, t, cw, None, -100, False), F.cross_entropy(z, t, cw, None, -100, False))


def test_cross_entropy_gradcheck_opcheck_and_compile():
    gen = _gen("cegc")
    z = torch.randn(6, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 8, -100, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda a: cross_entropy(a, t, label_smoothing=0.2, reduction="none"), (z,))
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: linear_cross_entropy(a, c, t, chunk_rows=4), (x, w))
    torch.library.opcheck(ce_mod.cross_entropy_op, (z.float().detach(), t, -100, 0.1))
    compiled = torch.compile(lambda a: cross_entropy(a, t), fullgraph=True, backend="eager")
    assert abs(compiled(z.float()).item() - F.cross_entropy(z.float(), t).item()) < 1e-5


def test_linear_cross_entropy_of_empty_features_is_torchs():
    """K = 0 features (all logits zero: loss log V) and zero rows give torch's result, not a reshape error."""
    for rows, k in [(3, 0), (0, 4)]:
        x, w = torch.randn(rows, k, requires_grad=True), torch.randn(5, k, requires_grad=True)
        t = torch.randint(0, 5, (rows,))
        want = F.cross_entropy(F.linear(x, w), t)
        got = linear_cross_entropy(x, w, t)
        assert torch.equal(got.isnan(), want.isnan()) and torch.allclose(got.nan_to_num(), want.nan_to_num())


def test_linear_cross_entropy_never_forms_full_logits():
    """The largest tensor allocated in the dlcore op is the [chunk, V] buffer: a profiler with memory tracking
    sees no allocation of [rows, V] floats (stock allocates several)."""
    from torch.profiler import ProfilerActivity, profile

    rows, hidden, vocab = 512, 32, 4096
    x = torch.randn(rows, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    full = rows * vocab * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        linear_cross_entropy(x, w, t, chunk_rows=64).backward()
    biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
    assert biggest < full / 4, f"an allocation of {biggest} bytes (full logits: {full})"


def test_chunk_rows_rule():
    """Liger's rule (about as many logits as inputs) on a GPU; on the CPU chunks of at least 32 MiB of logits
    (wider GEMMs), never more rows than there are."""
    from dlcore.ops.cross_entropy import CPU_CHUNK_BYTES, _chunk_rows

    assert _chunk_rows(2048, 8192, 768, "cuda") == 256
    assert _chunk_rows(2048, 8192, 768, "cpu") == 1024 and 1024 * 8192 * 4 == CPU_CHUNK_BYTES
    assert _chunk_rows(2048, 8192, 768, "cpu", itemsize=2) == 2048
    big = _chunk_rows(4096, 50257, 768, "cpu")
    assert big == 128 and big * 50257 * 4 <= CPU_CHUNK_BYTES
    assert _chunk_rows(10, 8192, 768, "cpu") == 10 and _chunk_rows(4096, 10 ** 9, 768, "cpu") == 64


def test_cross_entropy_bad_input():
    z = torch.randn(4, 10)
    with pytest.raises(IndexError, match="target holds 10"):
        cross_entropy(z, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(IndexError, match="target holds -3"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3), torch.tensor([0, -3, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        cross_entropy(z, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="class probabilities must have input's shape"):
        cross_entropy(z, torch.zeros(4))
    with pytest.raises(ValueError, match="ignore_index"):  # as torch: probabilities have no ignored rows
        cross_entropy(z, torch.softmax(torch.randn(4, 10), 1), ignore_index=0)
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\)"):
        cross_entropy(z, torch.zeros(4, dtype=torch.long), torch.ones(9))
    with pytest.raises(ValueError, match=r"target must have shape \(4, 3\)"):
        cross_entropy(torch.randn(4, 10, 3), torch.zeros(4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have shape"):
        cross_entropy(z, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(z, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(z, torch.zeros(4, dtype=torch.long), label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="'none'"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(10, 3), torch.zeros(4, dtype=torch.long),
                             reduction="none")
    one = cross_entropy(z[0], torch.tensor(3))
    assert abs(one.item() - F.cross_entropy(z[0], torch.tensor(3)).item()) < 1e-5
