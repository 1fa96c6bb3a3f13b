"""A NaN in the input comes out where torch's ReLU chains put it, on every backend: ReLU keeps NaN (torch.relu
does). The CPU and Triton activations computed ReLU as `z > 0 ? z : 0` / tl.maximum(z, 0), which turn NaN into 0
and hid a diverging run (found 2026-12-01: bias_act, linear_act, batch_norm_act, conv2d_relu's epilogue). Not
covered: FoldedConv2d's inference path, whose ReLU is oneDNN's fused post-op (NaN → 0, as torch.compile on the
CPU), and the opt-in Winograd form (a NaN spreads over its 4×4 output tile)."""
import pytest
import torch
import torch.nn.functional as F

import dlcore
import dlcore.functional as df
from dlcore.ops import batch_norm as bn_ops
from dlcore.ops import bias_gelu as bias_ops
from dlcore.ops import conv_pool as pool_ops
from dlcore.ops import conv_relu as conv_ops
from dlcore.testing import backend_device_pairs


def _with_nans(*shape, count=2):
    t = torch.randn(*shape)
    t.view(-1)[torch.randperm(t.numel())[:count]] = float("nan")
    return t


def _cases():
    x, img, bnx = _with_nans(5, 8), _with_nans(2, 3, 7, 7), _with_nans(3, 4, 5, 5)
    eye, w, b = torch.eye(8), torch.randn(4, 3, 3, 3), torch.randn(4)
    stats = (torch.randn(4), torch.rand(4) + 0.5)
    cl = img.contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 4, 5, 5)
    return [
        (bias_ops.FORWARD, "bias_act relu", lambda m: df.bias_act(x, torch.zeros(8), "relu") if m is df
         else F.relu(x)),
        (bias_ops.FORWARD, "linear_act relu", lambda m: df.linear_act(x, eye, None, "relu") if m is df
         else F.relu(F.linear(x, eye))),
        (bn_ops.AFFINE, "batch_norm_act relu, batch stats", lambda m: df.batch_norm_act(bnx, None, None, training=True)
         if m is df else F.relu(F.batch_norm(bnx, None, None, training=True))),
        (bn_ops.AFFINE, "batch_norm_act relu, running stats + residual",
         lambda m: df.batch_norm_act(bnx, *stats, training=False, residual=bnx.flip(0)) if m is df
         else F.relu(F.batch_norm(bnx, *stats, training=False) + bnx.flip(0))),
        (conv_ops.FORWARD, "conv2d_relu", lambda m: df.conv2d_relu(img, w, b) if m is df
         else F.relu(F.conv2d(img, w, b))),
        (conv_ops.FORWARD, "conv2d_relu channels_last + residual", lambda m: df.conv2d_relu(cl, w, b, residual=res)
         if m is df else F.relu(F.conv2d(img, w, b) + res)),
        (pool_ops.FORWARD, "conv2d_relu_maxpool2d", lambda m: df.conv2d_relu_maxpool2d(img, w, b, 1, 0, 1, 1, 3, 1)
         if m is df else F.max_pool2d(F.relu(F.conv2d(img, w, b)), 3, 1)),
    ]


CASES = [(op, backend, device, label, fn) for op, label, fn in _cases()
         for backend, device in backend_device_pairs(op, torch.float32)]


@pytest.mark.parametrize("op,backend,device,label,fn", CASES, ids=[f"{c[3]}-{c[1]}-{c[2]}" for c in CASES])
def test_relu_keeps_nan_as_torch(op, backend, device, label, fn):
    want = fn(F)
    assert want.isnan().any()  # the case really carries a NaN through
    with dlcore.use_backend(backend):
        got = fn(df).cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{label}: {int(got.isnan().sum())} NaNs, torch has " \
                                                   f"{int(want.isnan().sum())}"
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-4)
