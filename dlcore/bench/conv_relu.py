"""Benchmark cases for conv2d_relu: batch 16, the DQN convolutions (84×84 frames) and AlexNet's conv1/conv2, forward
and forward+backward. Peers: the eager chain F.relu(F.conv2d(...)) (NCHW), and torch.compile of that chain. Issue 3's
targets are for the full conv+ReLU+maxpool op; this case measures the conv+ReLU part that has landed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcore.bench.harness import DLCORE, Case

# name, (C_in, H, C_out, kernel, stride, padding)
SHAPES = [("DQN nature conv1", (4, 84, 32, 8, 4, 0)), ("DQN nature conv2", (32, 20, 64, 4, 2, 0)),
          ("AlexNet conv1", (3, 224, 64, 11, 4, 2)), ("AlexNet conv2", (64, 27, 192, 5, 1, 2))]
BATCH = 16


def _setup(shape, backward: bool, device: str):
    cin, h, cout, k, s, p = shape

    def setup(n_sets: int):
        from dlcore.functional import conv2d_relu

        xs = [torch.randn(BATCH, cin, h, h, device=device, requires_grad=backward) for _ in range(n_sets)]
        w = (torch.randn(cout, cin, k, k, device=device) * (cin * k * k) ** -0.5).requires_grad_(backward)
        b = torch.randn(cout, device=device, requires_grad=backward)
        state = {"i": 0}

        def chain(x):
            return F.relu(F.conv2d(x, w, b, s, p))

        compiled = torch.compile(chain)

        def variant(fn):
            def call():
                x = xs[state["i"] % n_sets]
                state["i"] += 1
                y = fn(x)
                if backward:
                    y.backward(torch.ones_like(y))
                return y
            return call

        return {DLCORE: variant(lambda x: conv2d_relu(x, w, b, s, p)), "torch eager": variant(chain),
                "torch.compile": variant(compiled)}

    return setup


def cases(device: str) -> list[Case]:
    out = []
    for name, shape in SHAPES:
        cin, h, cout, k, s, p = shape
        ho = (h + 2 * p - k) // s + 1
        flops = 2 * BATCH * cout * ho * ho * cin * k * k
        for backward in (False, True):
            out.append(Case("conv_relu", f"{name} {'fwd+bwd' if backward else 'fwd'} B{BATCH}", device,
                            _setup(shape, backward, device), flops=flops * (3 if backward else 1),
                            baseline="torch eager", ops=("conv2d_relu",),
                            quick=name.startswith("DQN") or not backward))
    return out
