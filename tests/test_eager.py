"""dlcore/_eager.py: in plain eager mode the ops run their Python bodies inside an autograd.Function built from the
same setup_context/backward as their custom op's registered autograd; traced calls (torch.compile, fake tensors,
torch-function modes, subclasses) still reach the custom op. Both paths give the same outputs and gradients."""
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from dlcore import _eager
from dlcore.ops import attention, bias_gelu, conv_relu, cross_entropy, layer_norm

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))


def _leaves(gen, *shapes):
    return [torch.randn(*s, generator=gen, dtype=torch.float64).float().requires_grad_() for s in shapes]


def _cases(gen):
    """(name, eager callable, custom op, make_args() → fresh leaf tensors + constants, index of the output to sum)"""
    return [
        ("layer_norm", layer_norm._layer_norm, layer_norm.layer_norm_op,
         lambda: (*_leaves(gen, (5, 7), (5, 7), (7,), (7,)), 1e-5), 0),
        ("bias_gelu", bias_gelu._bias_gelu, bias_gelu.bias_gelu_op,
         lambda: (*_leaves(gen, (3, 9), (9,)), 1, 0.0, 0), None),
        ("cross_entropy", cross_entropy._cross_entropy, cross_entropy.cross_entropy_op,
         lambda: (*_leaves(gen, (6, 11)), torch.randint(0, 11, (6,), generator=gen), -100, 0.1), 0),
        ("conv2d_relu", conv_relu._conv2d_relu, conv_relu.conv2d_relu_op,
         lambda: (*_leaves(gen, (2, 3, 9, 8), (4, 3, 3, 3), (4,)), None, [2, 1], [1, 1], [1, 1], 1), None),
        ("flash_attention", attention._attention, attention.attention_op,
         lambda: (*_leaves(gen, (2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)), None, None, 0.35, -1, 0, 0.0, 0), 0),
    ]


def _run(fn, args, pick):
    out = fn(*args)
    y = out if pick is None else out[pick]
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return y, [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("index", range(5))
def test_eager_path_matches_the_custom_op_and_is_the_one_taken(index):
    gen = torch.Generator().manual_seed(SEED + index)
    name, eager, op, make_args, pick = _cases(gen)[index]
    args = make_args()
    copies = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a
              for a in args]
    y_eager, grads_eager = _run(eager, args, pick)
    y_op, grads_op = _run(op, copies, pick)
    assert type(y_eager.grad_fn).__name__ == f"{name}_eagerBackward"  # the autograd.Function, not the op
    assert "GeneratedBackwardFor_dlcore" in type(y_op.grad_fn).__name__
    assert torch.equal(y_eager, y_op)
    assert len(grads_eager) == len(grads_op) and all(torch.equal(a, b) for a, b in zip(grads_eager, grads_op))
    with torch.no_grad():  # inference: the body alone, no graph
        out = eager(*make_args())
        assert (out if pick is None else out[pick]).grad_fn is None
    # grad mode on but no input wants a gradient: the body alone too, same output
    frozen = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = eager(*frozen)
    y = out if pick is None else out[pick]
    assert y.grad_fn is None and not y.requires_grad and torch.equal(y, y_eager)
    # one input wanting a gradient is enough to record the graph
    first = [a.detach().requires_grad_() if i == 0 else a for i, a in enumerate(frozen)]
    out = eager(*first)
    assert type((out if pick is None else out[pick]).grad_fn).__name__ == f"{name}_eagerBackward"


def test_wants_grad_looks_into_tensor_lists():
    leaf = torch.zeros(2, requires_grad=True)
    assert _eager.wants_grad((torch.zeros(1), [torch.zeros(1), leaf], 3))
    assert not _eager.wants_grad((torch.zeros(1), (torch.zeros(1),), None, 1.5))


def test_second_derivatives_on_both_paths():
    """Under create_graph=True, layer_norm's backward is differentiable on the eager path and through the custom
    op (torch's F.layer_norm gives the same second derivative), and so is attention's (against autograd of its
    reference math); x³ keeps the gradient in the graph whatever dlcore does. A kernel's backward op called under
    grad mode outside those branches raises when differentiated, instead of silently leaving its part out."""
    gen = torch.Generator().manual_seed(SEED)
    for fn in (layer_norm._layer_norm, layer_norm.layer_norm_op):
        x, w = _leaves(gen, (3, 5), (5,))
        xs, ws = (t.detach().clone().requires_grad_() for t in (x, w))
        for norm, a, b in ((lambda x, w: fn(x, None, w, None, 1e-5)[0], x, w),
                           (lambda x, w: F.layer_norm(x, (5,), w, None, 1e-5), xs, ws)):
            (ga,) = torch.autograd.grad(norm(a, b).pow(2).sum() + a.pow(3).sum(), a, create_graph=True)
            ga.square().sum().backward()
        torch.testing.assert_close(x.grad, xs.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(w.grad, ws.grad, rtol=1e-4, atol=1e-4)
    q, k, v = _leaves(gen, (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8))
    second = []
    for fn in (attention._attention, attention.attention_op,
               lambda *a: attention._reference_math(*a[:5], a[5], a[6:8], *a[8:])):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves, None, None, 0.35, -1, -1, 0.0, 0)[0]
        (gq,) = torch.autograd.grad(o.pow(2).sum() + leaves[0].pow(3).sum(), leaves[0], create_graph=True)
        second.append(torch.autograd.grad(gq.sum(), leaves))
    for path in second[:2]:
        for got, want in zip(path, second[2]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    o, lse = attention._attention(q, k, v, None, None, 0.35, -1, -1, 0.0, 0)
    dq = attention._attention_backward(torch.ones_like(o), q, k, v, o, lse, None, False, None, 0.35, -1, -1, 0.0, 0)[0]
    with pytest.raises(RuntimeError, match="dlcore flash_attention has no second derivative"):
        dq.sum().backward()


def test_linear_cross_entropy_second_derivative_on_both_paths():
    """Its first-order gradients are formed in the forward pass; under create_graph its backward re-forms them by
    autograd of F.linear + the reference cross-entropy, on the eager path and through the custom op alike."""
    gen = torch.Generator().manual_seed(SEED)
    x, w = _leaves(gen, (6, 5), (9, 5))
    target = torch.randint(0, 9, (6,), generator=gen)
    second = []
    for fn in (cross_entropy._linear_cross_entropy, cross_entropy.linear_cross_entropy_op,
               lambda x, w, *_: (F.cross_entropy(x @ w.t(), target),)):
        xs, ws = (t.detach().clone().requires_grad_() for t in (x, w))
        loss = fn(xs, ws, None, target, -100, 0.0, False, [True, True, False], 4)[0] + xs.pow(3).sum()
        (gx,) = torch.autograd.grad(loss, xs, create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum(), (xs, ws)))
    for path in second[:2]:
        for got, want in zip(path, second[2]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_attention_lse_stays_non_differentiable_in_eager():
    gen = torch.Generator().manual_seed(SEED)
    q, k, v = _leaves(gen, (1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 4, 8))
    o, lse = attention._attention(q, k, v, None, None, 0.35, -1, -1, 0.0, 0)
    assert o.requires_grad and not lse.requires_grad


def test_traced_calls_take_the_custom_op():
    x = torch.randn(4, 6, requires_grad=True)
    assert _eager.plain_eager((x, 1.0))
    with torch.device("cpu"):  # a torch-function mode
        assert not _eager.plain_eager((x,))
        y = layer_norm._layer_norm(x, None, None, None, 1e-5)[0]
        assert "GeneratedBackwardFor_dlcore" in type(y.grad_fn).__name__
    with FakeTensorMode() as mode:  # a dispatch mode: the op's fake implementation answers
        fake = mode.from_tensor(torch.randn(4, 6))
        y, h, mean, rstd = layer_norm._layer_norm(fake, None, None, None, 1e-5)
        assert y.shape == (4, 6) and mean.shape == (4,)

    class Marked(torch.Tensor):
        pass

    assert not _eager.plain_eager((torch.randn(2).as_subclass(Marked),))
    assert _eager.plain_eager((torch.nn.Parameter(torch.randn(2)),))


def test_compiled_calls_match_eager():
    gen = torch.Generator().manual_seed(SEED)
    x, r, w, b = _leaves(gen, (5, 7), (5, 7), (7,), (7,))

    def fn(x, r, w, b):
        y, h = layer_norm.layer_norm(x, 7, w, b, residual=r)
        return F.gelu(y).sum() + h.sum()

    compiled = torch.compile(fn, fullgraph=True)
    want = fn(x, r, w, b)
    want_grads = torch.autograd.grad(want, (x, r, w, b))
    got = compiled(x, r, w, b)
    got_grads = torch.autograd.grad(got, (x, r, w, b))
    torch.testing.assert_close(got, want)
    for a, b_ in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b_)
