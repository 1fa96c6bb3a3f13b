"""Second derivatives (backward with create_graph=True, then differentiate the gradient: Hessian-vector products,
gradient penalties, MAML) through the ops whose backward is a kernel or whose gradients the forward formed: flash
attention, cross-entropy, fused linear + cross-entropy, conv + ReLU + max-pool, NT-Xent and additive attention. Each is checked three ways: its Hessian-vector product equals the
stock-PyTorch chain's in float64; the first derivative that the create_graph branch forms equals the kernel's (fp32,
every CPU backend, dropout included: the same Philox mask); gradgradcheck in float64. (batch_norm_act, conv2d_relu,
bias_act and layer_norm have theirs tested beside their ops.)"""
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dlcore
import dlcore.functional as D
from dlcore.testing import backend_device_pairs, twins

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))


def _math_sdpa(*args, **kwargs):
    """torch's SDPA on its math backend: its flash CPU kernel has no second derivative (torch raises
    'derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented')."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _nt_xent_stock(z1, z2, temperature=0.5):
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    s = (u @ u.t() / temperature).fill_diagonal_(float("-inf"))
    m = u.shape[0]
    return F.cross_entropy(s, (torch.arange(m) + m // 2) % m)


def _additive_stock(ws, uh, v, h, lengths):
    e = (torch.tanh(ws[:, None, :] + uh) @ v).masked_fill(torch.arange(uh.shape[1]) >= lengths[:, None], float("-inf"))
    return torch.einsum("bs,bsd->bd", torch.softmax(e, 1), h)


# name → (dlcore's function, the stock chain, shapes of the differentiable inputs, make the other arguments (gen),
#         the backend op name whose CPU backends the first-derivative check runs)
OPS = {
    "attention": (lambda q, k, v, mask: D.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                  lambda q, k, v, mask: _math_sdpa(q, k, v, attn_mask=mask, enable_gqa=True),
                  ((2, 4, 7, 8), (2, 2, 9, 8), (2, 2, 9, 8)), lambda gen: (torch.randn(2, 1, 7, 9, generator=gen,
                                                                                      dtype=torch.float64),),
                  "attention"),
    "attention_causal": (lambda q, k, v: D.scaled_dot_product_attention(q, k, v, is_causal=True),
                         lambda q, k, v: _math_sdpa(q, k, v, is_causal=True),
                         ((1, 2, 5, 16), (1, 2, 5, 16), (1, 2, 5, 16)), lambda gen: (), "attention"),
    # one tensor at several places: each place must get only its own part of the gradient (autograd.grad with
    # respect to q, k and v, one tensor, gave the whole at each, three times the gradient)
    "attention_self": (lambda h: D.scaled_dot_product_attention(h, h, h, is_causal=True),
                       lambda h: _math_sdpa(h, h, h, is_causal=True), ((2, 3, 6, 8),), lambda gen: (), "attention"),
    "cross_entropy": (lambda z, t: D.cross_entropy(z, t, ignore_index=2, label_smoothing=0.1),
                      lambda z, t: F.cross_entropy(z, t, ignore_index=2, label_smoothing=0.1),
                      ((13, 7),), lambda gen: (torch.randint(0, 7, (13,), generator=gen),), "cross_entropy"),
    "cross_entropy_sum": (lambda z, t: D.cross_entropy(z, t, reduction="sum"),
                          lambda z, t: F.cross_entropy(z, t, reduction="sum"),
                          ((5, 3, 4),), lambda gen: (torch.randint(0, 3, (5, 4), generator=gen),), "cross_entropy"),
    "linear_cross_entropy": (lambda x, w, b, t: D.linear_cross_entropy(x, w, t, bias=b, ignore_index=0,
                                                                       label_smoothing=0.05, chunk_rows=3),
                             lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b).flatten(0, 1), t.flatten(),
                                                                ignore_index=0, label_smoothing=0.05),
                             ((2, 4, 6), (9, 6), (9,)),
                             lambda gen: (torch.randint(0, 9, (2, 4), generator=gen),), "cross_entropy"),
    "conv2d_relu_maxpool2d": (lambda x, w, b: D.conv2d_relu_maxpool2d(x, w, b, padding=1, pool_kernel_size=3,
                                                                      pool_stride=2),
                              lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 3, 2),
                              ((2, 3, 7, 8), (4, 3, 3, 3), (4,)), lambda gen: (), "conv2d_relu_maxpool2d"),
    "nt_xent": (D.nt_xent_loss, _nt_xent_stock, ((5, 6), (5, 6)), lambda gen: (), "nt_xent"),
    "additive_attention": (lambda ws, uh, v, h, n: D.additive_attention(ws, uh, v, h, n)[0], _additive_stock,
                           ((3, 5), (3, 6, 5), (5,), (3, 6, 4)),
                           lambda gen: (torch.randint(1, 7, (3,), generator=gen),), "additive_attention"),
    "additive_attention_shared": (lambda ws, h, v: D.additive_attention(ws, h, v, h)[0],
                                  lambda ws, h, v: _additive_stock(ws, h, v, h, torch.full((2,), 4)),
                                  ((2, 5), (2, 4, 5), (5,)), lambda gen: (), "additive_attention"),
}


def _draw(name, gen, dtype=torch.float64):
    _, _, shapes, extra, _ = OPS[name]
    leaves = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    return leaves, [e.to(dtype) if e.is_floating_point() else e for e in extra(gen)]


def _hvp(fn, leaves, extra, direction, weights):
    """Σ_i ⟨∂/∂leaf_i (Σ weights·fn), direction_i⟩ differentiated once more: the Hessian-vector product, per leaf."""
    y = fn(*leaves, *extra)
    grads = torch.autograd.grad((y * weights).sum(), leaves, create_graph=True)
    return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, direction)), leaves, allow_unused=True)


@pytest.mark.parametrize("name", OPS)
def test_hessian_vector_product_matches_stock(name):
    ours, stock, *_ = OPS[name]
    gen = torch.Generator().manual_seed(SEED)
    leaves, extra = _draw(name, gen)
    with torch.no_grad():
        shape = stock(*leaves, *extra).shape
    weights = torch.randn(shape, generator=gen, dtype=torch.float64)
    direction = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in leaves]
    got = _hvp(ours, leaves, extra, direction, weights)
    want = _hvp(stock, [t.detach().clone().requires_grad_() for t in leaves], extra, direction, weights)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), (name, i)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=f"{name}: input {i}")


@pytest.mark.parametrize("name", OPS)
def test_gradgradcheck(name):
    ours, *_ = OPS[name]
    gen = torch.Generator().manual_seed(SEED)
    leaves, extra = _draw(name, gen)
    assert torch.autograd.gradgradcheck(lambda *a: ours(*a, *extra), tuple(leaves))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OPS)
def test_16_bit_second_derivative_keeps_dtypes(name, dtype):
    """In bf16/fp16 the create_graph branch (its math in fp32) returns gradients in the inputs' dtype, close to the
    kernels' first derivative, and a finite Hessian-vector product."""
    ours, *_ = OPS[name]
    gen = torch.Generator().manual_seed(SEED)
    leaves, extra = _draw(name, gen, dtype)
    y = ours(*leaves, *extra).float()
    weights = torch.randn(y.shape, generator=gen)
    kernel = torch.autograd.grad((y * weights).sum(), leaves, retain_graph=True)
    grads = torch.autograd.grad((y * weights).sum(), leaves, create_graph=True)
    for k, g, leaf in zip(kernel, grads, leaves):
        assert g.dtype == leaf.dtype, (name, g.dtype)
        scale = k.float().abs().max().item() + 1e-3
        assert (g.float() - k.float()).abs().max().item() <= 0.05 * scale, name
    hvp = torch.autograd.grad(sum(g.float().square().sum() for g in grads), leaves, allow_unused=True)
    assert all(h is None or torch.isfinite(h).all() for h in hvp), name


def _first_derivative_cases():
    return [(name, backend) for name in OPS
            for backend, device in backend_device_pairs(OPS[name][4], torch.float32) if device == "cpu"]


@pytest.mark.parametrize("name,backend", _first_derivative_cases())
def test_create_graph_first_derivative_equals_the_kernels(name, backend):
    """The create_graph branch re-forms the gradient from torch ops; it must be the gradient the kernels give."""
    ours, *_ = OPS[name]
    gen = torch.Generator().manual_seed(SEED)
    leaves, extra = _draw(name, gen, torch.float32)
    with dlcore.use_backend(backend):
        y = ours(*leaves, *extra)
        weights = torch.randn(y.shape, generator=gen)
        kernel = torch.autograd.grad((y * weights).sum(), leaves, retain_graph=True)
        differentiable = torch.autograd.grad((y * weights).sum(), leaves, create_graph=True)
    for i, (a, b) in enumerate(zip(kernel, differentiable)):
        assert b.requires_grad, (name, i)
        torch.testing.assert_close(a, b.detach(), rtol=2e-5, atol=2e-5, msg=f"{name} ({backend}): input {i}")


@pytest.mark.parametrize("backend", [b for b, d in backend_device_pairs("attention", torch.float32) if d == "cpu"])
def test_attention_dropout_second_derivative_uses_the_forwards_mask(backend):
    """With dropout, the create_graph gradient regenerates the forward's Philox mask: the first derivative equals
    the kernel's, and the Hessian-vector product equals autograd of the reference math with that mask."""
    from dlcore.ops import attention as A

    gen = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen).requires_grad_() for _ in range(3))
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    dout = torch.randn(1, 2, 6, 8, generator=gen)
    with dlcore.use_backend(backend):
        o = A._attention(q, k, v, None, None, 0.3, -1, 0, 0.4, seed)[0]
        kernel = torch.autograd.grad(o, (q, k, v), dout, retain_graph=True)
        differentiable = torch.autograd.grad(o, (q, k, v), dout, create_graph=True)
    for a, b in zip(kernel, differentiable):
        torch.testing.assert_close(a, b.detach(), rtol=2e-5, atol=2e-5)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = A._reference_math(qd, kd, vd, None, None, 0.3, (-1, 0), 0.4, seed)[0]
    want = torch.autograd.grad(torch.autograd.grad(ref, (qd, kd, vd), dout.double(), create_graph=True)[0].square()
                               .sum(), (qd, kd, vd))
    got = torch.autograd.grad(differentiable[0].square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_maml_meta_gradient_through_a_dlcore_transformer_layer():
    """One MAML inner step through attention + cross-entropy: the meta-gradient (second order) equals the same
    computation with stock ops, in float64."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(3, 2, 5, 8, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 8, (3 * 2 * 5,), generator=gen)
    w0 = (torch.randn(8, 8, generator=gen, dtype=torch.float64) / math.sqrt(8)).requires_grad_()
    meta = []
    for attend, xent in ((D.scaled_dot_product_attention, D.cross_entropy),
                         (_math_sdpa, F.cross_entropy)):
        def loss(w):
            h = x @ w
            return xent(attend(h, h, h, is_causal=True).reshape(-1, 8), target)
        (g,) = torch.autograd.grad(loss(w0), w0, create_graph=True)
        meta.append(torch.autograd.grad(loss(w0 - 0.1 * g), w0)[0])
    torch.testing.assert_close(meta[0], meta[1], rtol=1e-9, atol=1e-9)


def test_gpt_hessian_vector_product_matches_the_stock_twin():
    """Hessian-vector product of a whole dlcore GPT's loss (layer_norm, attention, GELU MLP, fused linear +
    cross-entropy) equals its stock twin's in float64: the product Sophia-H-style optimizers and curvature
    probes take."""
    from dlcore.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=29, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(SEED)
    ours, twin = twins(lambda stock: GPT(cfg, stock=stock))
    gen = torch.Generator().manual_seed(SEED)
    idx, targets = (torch.randint(0, cfg.vocab_size, (2, 11), generator=gen) for _ in range(2))
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ours.parameters()]
    products = []
    for model in (ours, twin):
        params = list(model.parameters())
        with sdpa_kernel(SDPBackend.MATH):
            grads = torch.autograd.grad(model(idx, targets), params, create_graph=True)
            dot = sum((g * d).sum() for g, d in zip(grads, direction))
            products.append(torch.autograd.grad(dot, params, allow_unused=True))
    for (name, _), a, b in zip(ours.named_parameters(), *products):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
