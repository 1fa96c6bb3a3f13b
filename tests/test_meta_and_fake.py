"""Shape-only tensors, as torch's own ops take them: meta tensors (a model built under torch.device("meta") for
deferred initialisation, FLOP counting) and FakeTensorMode. dlcore's public ops give torch's output and gradient
shapes instead of "no backend can run on meta" (the eager shortcut now hands meta tensors to the custom ops'
fake kernels), and their range checks on values (class indices, key lengths, token ids) are left out where values
do not exist, as torch leaves its own to the device kernel (found 2026-12-01)."""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import dlcore.functional as df
from dlcore.models.gpt import CONFIGS, GPT

CASES = {  # name: (dlcore call, torch call); t(*shape) makes a fresh float leaf, i(n) n class indices / lengths
    "layer_norm+residual": (lambda t, i: df.layer_norm(t(4, 16), (16,), residual=t(4, 16))[0],
                            lambda t, i: F.layer_norm(t(4, 16) + t(4, 16), (16,))),
    "bias_gelu": (lambda t, i: df.bias_gelu(t(4, 16), t(16)), lambda t, i: F.gelu(t(4, 16) + t(16))),
    "sdpa, key lengths": (lambda t, i: df.scaled_dot_product_attention(t(2, 2, 4, 8), t(2, 2, 6, 8), t(2, 2, 6, 8),
                                                                    key_lengths=i(2) + 1),
                          lambda t, i: F.scaled_dot_product_attention(t(2, 2, 4, 8), t(2, 2, 6, 8), t(2, 2, 6, 8))),
    "conv2d_relu": (lambda t, i: df.conv2d_relu(t(2, 3, 9, 9), t(4, 3, 3, 3), t(4)),
                    lambda t, i: F.relu(F.conv2d(t(2, 3, 9, 9), t(4, 3, 3, 3), t(4)))),
    "conv2d_relu_maxpool2d": (lambda t, i: df.conv2d_relu_maxpool2d(t(2, 3, 9, 9), t(4, 3, 3, 3)),
                              lambda t, i: F.max_pool2d(F.relu(F.conv2d(t(2, 3, 9, 9), t(4, 3, 3, 3))), 3)),
    "batch_norm_act": (lambda t, i: df.batch_norm_act(t(2, 3, 4, 4), None, None, training=True),
                       lambda t, i: F.relu(F.batch_norm(t(2, 3, 4, 4), None, None, training=True))),
    "cross_entropy": (lambda t, i: df.cross_entropy(t(4, 10), i(4)),
                      lambda t, i: F.cross_entropy(t(4, 10), i(4))),
    "linear_cross_entropy": (lambda t, i: df.linear_cross_entropy(t(4, 16), t(10, 16), i(4)),
                             lambda t, i: F.cross_entropy(F.linear(t(4, 16), t(10, 16)), i(4))),
}


def _run(call, device):
    """Tensors made on `device` explicitly (no torch.device context, which would route every call through the
    custom ops anyway)."""
    leaves = []

    def make(*shape):
        leaves.append(torch.empty(shape, device=device).requires_grad_())
        return leaves[-1]

    out = call(make, lambda n: torch.zeros(n, dtype=torch.long, device=device))
    out.sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("name", sorted(CASES))
def test_meta_tensors_give_torchs_shapes_and_gradients(name):
    ours, stock = CASES[name]
    out, grads = _run(ours, "meta")
    want, want_grads = _run(stock, "meta")
    assert out.is_meta and out.shape == want.shape and out.dtype == want.dtype
    assert [g.shape for g in grads] == [g.shape for g in want_grads[:len(grads)]] and all(g.is_meta for g in grads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_tensor_mode_gives_torchs_shapes(name):
    ours, stock = CASES[name]
    with FakeTensorMode():
        out = ours(lambda *shape: torch.empty(shape), lambda n: torch.zeros(n, dtype=torch.long))
        want = stock(lambda *shape: torch.empty(shape), lambda n: torch.zeros(n, dtype=torch.long))
    assert out.shape == want.shape and out.dtype == want.dtype


def test_gpt_built_and_run_on_meta():
    with torch.device("meta"):
        model = GPT(CONFIGS["tiny"])
        idx = torch.zeros(2, 5, dtype=torch.long)
        loss = model(idx, idx)
        loss.backward()
        logits = model(idx)
    assert loss.shape == () and logits.shape == (2, 5, CONFIGS["tiny"].vocab_size)
    assert model.lm_head.weight.grad.is_meta and model.lm_head.weight.grad.shape == model.lm_head.weight.shape
