"""Benchmark cases for issue 3's ops, batch 16, forward and forward+backward, NCHW inputs:
- conv2d_relu at the DQN convolutions (84×84 frames) and AlexNet's conv1/conv2;
- conv2d_relu_maxpool2d at AlexNet's conv1/conv2/conv5 with their overlapping 3×3/2 pools, and their
  forward+backward once more with every variant given channels_last tensors.
Peers: the eager chain F.relu(F.conv2d(...)) (→ F.max_pool2d), the same chain on channels_last tensors, and
torch.compile of the NCHW chain."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcore.bench.harness import DLCORE, Case

# name, (C_in, H, C_out, kernel, stride, padding), pool (kernel, stride) or None
SHAPES = [("DQN nature conv1", (4, 84, 32, 8, 4, 0), None), ("DQN nature conv2", (32, 20, 64, 4, 2, 0), None),
          ("AlexNet conv1", (3, 224, 64, 11, 4, 2), None), ("AlexNet conv2", (64, 27, 192, 5, 1, 2), None),
          ("AlexNet conv1+pool", (3, 224, 64, 11, 4, 2), (3, 2)), ("AlexNet conv2+pool", (64, 27, 192, 5, 1, 2), (3, 2)),
          ("AlexNet conv5+pool", (256, 13, 256, 3, 1, 1), (3, 2))]
BATCH = 16


def _setup(shape, pool, backward: bool, device: str, channels_last: bool = False):
    """Variants over NCHW inputs (dlcore, the eager chain, the chain on channels_last copies, torch.compile), or
    with channels_last=True every variant on channels_last inputs (dlcore, the eager chain, torch.compile): the
    same layout on both sides, without the layout moves dlcore's CPU path makes for NCHW tensors."""
    cin, h, cout, k, s, p = shape

    def setup(n_sets: int):
        from dlcore.functional import conv2d_relu, conv2d_relu_maxpool2d

        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xs = [torch.randn(BATCH, cin, h, h, device=device).contiguous(memory_format=fmt).requires_grad_(backward)
              for _ in range(n_sets)]
        w = (torch.randn(cout, cin, k, k, device=device) * (cin * k * k) ** -0.5).requires_grad_(backward)
        b = torch.randn(cout, device=device, requires_grad=backward)
        state = {"i": 0}

        def chain(x):
            y = F.relu(F.conv2d(x, w, b, s, p))
            return y if pool is None else F.max_pool2d(y, *pool)

        def ours(x):
            return conv2d_relu(x, w, b, s, p) if pool is None else conv2d_relu_maxpool2d(x, w, b, s, p, 1, 1, *pool)

        compiled = torch.compile(chain)

        def variant(fn, inputs=xs):
            def call():
                x = inputs[state["i"] % n_sets]
                state["i"] += 1
                y = fn(x)
                if backward:
                    y.backward(torch.ones_like(y))
                return y
            return call

        variants = {DLCORE: variant(ours), "torch eager": variant(chain)}
        if not channels_last:  # the eager chain on channels_last copies of the NCHW inputs
            xs_cl = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(backward) for x in xs]
            variants["torch eager channels_last"] = variant(chain, xs_cl)
        variants["torch.compile"] = variant(compiled)
        return variants

    return setup


def _classifier_case(device: str) -> Case:
    """AlexNet's fc6 in training: Linear(9216 → 4096) + ReLU + Dropout(0.5), forward+backward, B16."""
    from dlcore.bench.transformer import _case
    from dlcore.functional import linear_act

    batch, fin, fout = BATCH, 9216, 4096
    w = torch.randn(fout, fin, device=device) * fin ** -0.5
    w.requires_grad_()

    def make_inputs():
        return (torch.randn(batch, fin, device=device, requires_grad=True),
                torch.randn(fout, device=device, requires_grad=True))

    def ours(x, b):
        return linear_act(x, w, b, "relu", 0.5)

    def stock(x, b):
        return F.dropout(F.relu(F.linear(x, w, b)), 0.5)

    nbytes = 4 * (2 * fin * fout + 4 * batch * fout)  # the weight read twice and written once dominates
    return _case("conv_relu", f"AlexNet fc6 Linear+ReLU+Dropout(0.5) fwd+bwd B{batch}", device, make_inputs, ours,
                 stock, nbytes, flops=6.0 * batch * fin * fout, ops=("bias_gelu", "bias_gelu_backward"))


def cases(device: str) -> list[Case]:
    out = [_classifier_case(device)]
    for name, shape, pool in SHAPES:
        cin, h, cout, k, s, p = shape
        ho = (h + 2 * p - k) // s + 1
        flops = 2 * BATCH * cout * ho * ho * cin * k * k
        for backward in (False, True):
            # issue 3: forward ≥ 2.0× eager on conv1+pool (and ≥ 1.0× compiled); forward+backward ≥ 1.3× eager
            target = (1.3 if backward else 2.0 if name == "AlexNet conv1+pool" else None) if pool else None
            out.append(Case("conv_relu", f"{name} {'fwd+bwd' if backward else 'fwd'} B{BATCH}", device,
                            _setup(shape, pool, backward, device), flops=flops * (3 if backward else 1),
                            baseline="torch eager", target=target,
                            ops=("conv2d_relu",) if pool is None else ("conv2d_relu_maxpool2d",),
                            quick=name.startswith("DQN") or not backward))
        if pool is not None:  # the same fwd+bwd with both sides given channels_last tensors (no target)
            out.append(Case("conv_relu", f"{name} fwd+bwd B{BATCH} channels_last", device,
                            _setup(shape, pool, True, device, channels_last=True), flops=flops * 3,
                            baseline="torch eager", ops=("conv2d_relu_maxpool2d",), quick=False))
    return out
