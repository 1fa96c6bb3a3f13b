"""Strided, sliced, transposed and expanded (stride-0) tensors as arguments of the public ops: every backend gives
torch's result and gradients. Found by a fuzz of such views (2026-12-01): layer_norm and bias_act read a strided
or expanded weight / bias as dense, conv2d_relu's CPU epilogue a strided bias, its few-channel input gradient
read a freed copy of a non-contiguous weight, and cross_entropy's backward wrote sliced logits' gradient past its
buffer (a heap overflow that aborted the process) and expanded logits' into one row; cross_entropy and
linear_cross_entropy read a strided or expanded target as dense."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
import dlcore.functional as df
from dlcore.ops import bias_gelu as bias_ops
from dlcore.ops import conv_relu as conv_ops
from dlcore.ops import cross_entropy as ce_ops
from dlcore.ops import layer_norm as ln_ops
from dlcore.testing import backend_device_pairs, max_error

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


def _cases():
    """(op name for the backends, label, leaf shapes, fn(module, *leaves) → tensor) with `module` F or dlcore's
    functional; each fn makes its views of the leaves (so the gradients flow back through the views)."""
    t = torch.tensor([1, 0, 6, 3, 2, 5, 4, 0])

    def conv(m, x, w, b, r=None):
        if m is F:
            z = F.conv2d(x, w, b)
            return F.relu(z if r is None else z + r)
        return df.conv2d_relu(x, w, b, residual=r)

    return [
        (ln_ops.FORWARD, "layer_norm strided weight, bias", [(6, 16), (32,), (32,)],
         lambda m, x, w, b: m.layer_norm(x, (16,), w[::2], b[1::2])),
        (ln_ops.FORWARD, "layer_norm expanded weight, bias", [(6, 16), (1,), (1,)],
         lambda m, x, w, b: m.layer_norm(x, (16,), w.expand(16), b.expand(16))),
        (ln_ops.FORWARD, "layer_norm sliced input, expanded residual", [(6, 32), (1, 16)],
         lambda m, x, r: (m.layer_norm(x[:, ::2], (16,), residual=r.expand(6, 16))[0] if m is df
                          else F.layer_norm(x[:, ::2] + r.expand(6, 16), (16,)))),
        (bias_ops.FORWARD, "bias_gelu strided bias, transposed input", [(16, 6), (32,)],
         lambda m, x, b: (df.bias_gelu(x.t(), b[::2]) if m is df else F.gelu(x.t() + b[::2]))),
        (conv_ops.FORWARD, "conv2d_relu strided bias", [(2, 3, 9, 9), (4, 3, 3, 3), (8,)],
         lambda m, x, w, b: conv(m, x, w, b[::2])),
        (conv_ops.FORWARD, "conv2d_relu expanded weight (few input channels)", [(2, 3, 9, 9), (1, 3, 3, 3)],
         lambda m, x, w: conv(m, x, w.expand(4, 3, 3, 3), None)),
        (conv_ops.FORWARD, "conv2d_relu sliced input, expanded residual", [(2, 3, 9, 18), (4, 3, 3, 3), (1, 4, 7, 7)],
         lambda m, x, w, r: conv(m, x[..., ::2], w, None, r.expand(2, 4, 7, 7))),
        (ce_ops.FORWARD, "cross_entropy sliced logits", [(8, 20)],
         lambda m, z: m.cross_entropy(z[:, :7], t.clamp(max=6))),
        (ce_ops.FORWARD, "cross_entropy expanded logits", [(1, 10)],
         lambda m, z: m.cross_entropy(z.expand(8, 10), t, label_smoothing=0.1)),
        (ce_ops.FORWARD, "cross_entropy strided and expanded targets", [(4, 10)],
         lambda m, z: m.cross_entropy(z, t[::2]) + m.cross_entropy(z, t[2:3].expand(4))),
        (ce_ops.FORWARD, "linear_cross_entropy strided target", [(4, 8), (10, 8)],
         lambda m, x, w: (df.linear_cross_entropy(x, w, t[1::2]) if m is df
                          else F.cross_entropy(F.linear(x, w), t[1::2]))),
    ]


CASES = [(op, backend, device, label, shapes, fn) for op, label, shapes, fn in _cases()
         for backend, device in backend_device_pairs(op, torch.float32)]


@pytest.mark.parametrize("op,backend,device,label,shapes,fn", CASES,
                         ids=[f"{c[3]}-{c[1]}-{c[2]}" for c in CASES])
def test_views_as_arguments_match_torch(op, backend, device, label, shapes, fn):
    torch.manual_seed(SEED % 10007)
    leaves = [_leaf(*s) for s in shapes]
    want = fn(F, *leaves)  # float64 torch: the oracle
    want_grads = torch.autograd.grad(want.sum(), leaves)
    ours = [t.detach().float().to(device).requires_grad_() for t in leaves]
    with dlcore.use_backend(backend):
        got = fn(df, *ours)
        got_grads = torch.autograd.grad(got.sum(), ours)
    assert got.shape == want.shape
    scale = 1 + want.abs().max().item()
    assert max_error(got.cpu(), want) <= 1e-5 * scale, f"{label}: output"
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert max_error(g.cpu(), w) <= 1e-5 * (1 + w.abs().max().item()), f"{label}: gradient of leaf {i}"
