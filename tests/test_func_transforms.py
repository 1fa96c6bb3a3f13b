"""torch.func transforms through dlcore: grad, grad of grad, hessian (forward over reverse mode), vmap of grad
(per-sample gradients, DP-SGD's) and functional_call. Inside a transform the ops run their plain-PyTorch reference
(dlcore/_eager.py under_transform): torch's custom-op autograd wrapper is refused by the transforms (it raised
"must override the setup_context staticmethod", pytorch/pytorch#170834 — for every dlcore op), and the kernels read
raw pointers. Each result is compared with the stock-PyTorch chain under the same transform (float64), or, for
whole models, with per-sample gradients taken one sample at a time by autograd through the kernels."""
import copy
import os
import time

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import dlcore.functional as D
import dlcore.nn as dnn
from dlcore.testing import twins

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))


def _math_sdpa(*args, **kwargs):  # torch's flash SDPA on the CPU has no second derivative and no forward AD
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _ops(gen, d=torch.float64):
    """name → (dlcore's scalar function of x, the stock one, x's shape), constants drawn from gen, in dtype d."""
    w, b = torch.randn(7, 4, generator=gen, dtype=d), torch.randn(7, generator=gen, dtype=d)
    wc, g = torch.randn(3, 2, 3, 3, generator=gen, dtype=d), torch.randn(2, generator=gen, dtype=d)
    t = torch.randint(0, 7, (5,), generator=gen)
    mix = torch.randn(3, 7, generator=gen, dtype=d)  # weights, so that sums of outputs are not trivial
    wide = torch.randn(512, 256, generator=gen, dtype=d) / 16  # 2 rows: the skinny CPU GEMM's shape in fp32

    def nt_xent_stock(z):
        u = F.normalize(z, dim=1)
        s = (u @ u.t() / 0.5).fill_diagonal_(float("-inf"))
        return F.cross_entropy(s, (torch.arange(4) + 2) % 4)

    def additive_stock(h):
        e = torch.tanh(h[:, :1, :] + h) @ b[:3]
        return (torch.einsum("bs,bsd->bd", torch.softmax(e, 1), h) * mix[:2, :3]).sum()

    return {
        "cross_entropy": (lambda z: D.cross_entropy(z, t, label_smoothing=0.1),
                          lambda z: F.cross_entropy(z, t, label_smoothing=0.1), (5, 7)),
        "linear_cross_entropy": (lambda x: D.linear_cross_entropy(x, w, t, bias=b),
                                 lambda x: F.cross_entropy(F.linear(x, w, b), t), (5, 4)),
        "attention": (lambda q: (D.scaled_dot_product_attention(q, q, q, is_causal=True) * mix[:, :4]).sum(),
                      lambda q: (_math_sdpa(q, q, q, is_causal=True) * mix[:, :4]).sum(), (1, 2, 3, 4)),
        "linear": (lambda x: D.linear(x, wide).square().sum(), lambda x: F.linear(x, wide).square().sum(), (2, 256)),
        "layer_norm": (lambda x: (D.layer_norm(x, (4,), b[:4], None) * mix[:, :4]).sum(),
                       lambda x: (F.layer_norm(x, (4,), b[:4], None) * mix[:, :4]).sum(), (3, 4)),
        "linear_gelu": (lambda x: (D.linear_gelu(x, w, b) * mix[:1, :]).sum(),
                        lambda x: (F.gelu(F.linear(x, w, b)) * mix[:1, :]).sum(), (5, 4)),
        "conv2d_relu": (lambda x: (D.conv2d_relu(x, wc, b[:3], padding=1) * mix[0, 0]).sum(),
                        lambda x: (F.relu(F.conv2d(x, wc, b[:3], padding=1)) * mix[0, 0]).sum(), (1, 2, 4, 5)),
        "conv2d_relu_maxpool2d": (lambda x: D.conv2d_relu_maxpool2d(x, wc, None, padding=1, pool_kernel_size=2).sum(),
                                  lambda x: F.max_pool2d(F.relu(F.conv2d(x, wc, None, padding=1)), 2).sum(),
                                  (1, 2, 4, 4)),
        "batch_norm_act": (lambda x: D.batch_norm_act(x, None, None, g, None, True).square().sum(),
                           lambda x: F.relu(F.batch_norm(x, None, None, g, None, True)).square().sum(), (3, 2, 2, 2)),
        "nt_xent": (lambda z: D.nt_xent_loss(z[:2], z[2:]), nt_xent_stock, (4, 3)),
        "additive_attention": (lambda h: (D.additive_attention(h[:, 0, :], h, b[:3], h)[0] * mix[:2, :3]).sum(),
                               additive_stock, (2, 3, 3)),
    }


TRANSFORMS = {
    "grad": lambda f, x: grad(f)(x),
    "grad_of_grad": lambda f, x: grad(lambda y: grad(f)(y).square().sum())(x),
    "hessian": lambda f, x: hessian(f)(x),
    "vmap_grad": lambda f, x: vmap(grad(f))(torch.stack([x, 0.5 * x, x + 0.1])),
}


@pytest.mark.parametrize("name", list(_ops(torch.Generator())))
def test_forward_ad_tangents_match_stock(name):
    """torch.autograd.forward_ad's dual tensors (no transform) in fp32, where the kernels would run: the tangent
    equals the stock chain's (the kernels dropped it: None came back)."""
    gen = torch.Generator().manual_seed(SEED)
    ours, stock, shape = _ops(gen, torch.float32)[name]
    x, tangent = (torch.randn(shape, generator=gen) for _ in range(2))
    results = []
    for fn in (ours, stock):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(fn(fwAD.make_dual(x, tangent)))
        assert out.tangent is not None, name
        results.append(out)
    torch.testing.assert_close(results[0].primal, results[1].primal, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0].tangent, results[1].tangent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(_ops(torch.Generator())))
def test_batched_grad_outputs_match_stock(name):
    """autograd.grad(..., is_grads_batched=True) (torch.autograd.functional.jacobian(vectorize=True) uses it) in fp32,
    where the kernels' backward would run: torch's legacy vmap batches the incoming gradient, which has no pointer
    ("Cannot access data pointer" before), so the backward takes its torch-op form."""
    gen = torch.Generator().manual_seed(SEED)
    ours, stock, shape = _ops(gen, torch.float32)[name]
    x = torch.randn(shape, generator=gen)
    scales = torch.tensor([1.0, -2.0, 0.5])
    results = []
    for fn in (ours, stock):
        leaf = x.clone().requires_grad_()
        results.append(torch.autograd.grad(fn(leaf), leaf, scales, is_grads_batched=True)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name", list(_ops(torch.Generator())))
def test_transform_matches_stock(name, transform):
    gen = torch.Generator().manual_seed(SEED)
    ours, stock, shape = _ops(gen)[name]
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    got, want = TRANSFORMS[transform](ours, x), TRANSFORMS[transform](stock, x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def _per_sample_grads_match_one_at_a_time(model, inputs, targets, loss_fn, rtol):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, t):
        return loss_fn(functional_call(model, p, (x[None],)), t[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    for i in range(inputs.shape[0]):  # autograd through the kernels, one sample at a time
        model.zero_grad()
        loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(batched[k][i], p.grad, rtol=rtol, atol=rtol, msg=f"sample {i}: {k}")


def test_per_sample_gradients_through_dlcore_layers():
    """DP-SGD's per-sample gradients (vmap over grad over functional_call) through dlcore.nn's fused layers."""
    torch.manual_seed(SEED)
    mlp = nn.Sequential(dnn.Linear(6, 16), dnn.LinearGELU(16, 16), dnn.LinearReLUDropout(16, 16, p=0.0),
                        dnn.LayerNorm(16), dnn.Linear(16, 5))
    cnn = nn.Sequential(dnn.Conv2dReLU(3, 4, 3, padding=1),
                        dnn.Conv2dReLUMaxPool2d(4, 4, 3, padding=1, pool_kernel_size=2), nn.Flatten(),
                        dnn.Linear(4 * 4 * 4, 5))
    targets = torch.randint(0, 5, (4,))
    _per_sample_grads_match_one_at_a_time(mlp, torch.randn(4, 6), targets, dnn.CrossEntropyLoss(), 1e-5)
    _per_sample_grads_match_one_at_a_time(cnn, torch.randn(4, 3, 8, 8), targets, F.cross_entropy, 1e-5)


def test_gpt_per_sample_gradients_match_the_stock_twin():
    from dlcore.models.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=29, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(SEED)
    ours, twin = twins(lambda stock: GPT(cfg, stock=stock))
    gen = torch.Generator().manual_seed(SEED)
    idx, targets = (torch.randint(0, cfg.vocab_size, (3, 7), generator=gen) for _ in range(2))
    grads = []
    for model in (ours, twin):
        params = {k: v.detach() for k, v in model.named_parameters()}
        with sdpa_kernel(SDPBackend.MATH):
            grads.append(vmap(grad(lambda p, i, t: functional_call(model, p, (i[None], t[None]))),
                              in_dims=(None, 0, 0))(params, idx, targets))
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-9, atol=1e-10, msg=k)


def test_resnet_through_patch_and_fuse_under_vmap():
    """Batched inference (vmap over a model) of a patched and of a fused ResNet equals calling it per item (its
    layout queries and CPU inference paths step aside inside a transform: vmap cannot answer is_contiguous for
    channels-last), and per-sample gradients through a patched ResNet in training (torch.func's batch-norm
    replacement: batch statistics, no running ones) equal one-at-a-time autograd (float64, where the eager path
    is dlcore's reference backend too)."""
    from torch.func import replace_all_batch_norm_modules_

    from dlcore.models.resnet import resnet18
    from dlcore.patching import fuse_for_inference, patch

    torch.manual_seed(SEED)
    x = torch.randn(3, 2, 3, 32, 32)
    for model in (patch(resnet18(num_classes=10)).eval(), fuse_for_inference(resnet18(num_classes=10).eval())):
        with torch.no_grad():
            torch.testing.assert_close(vmap(model)(x), torch.stack([model(item) for item in x]), rtol=1e-4,
                                       atol=1e-4)
    stock = resnet18(num_classes=10).eval()  # forward AD through the folded inference paths: stock's tangent
    fused = fuse_for_inference(copy.deepcopy(stock))
    tangent = torch.randn(x[0].shape)
    jvps = []
    for model in (stock, fused):
        with torch.no_grad(), fwAD.dual_level():
            jvps.append(fwAD.unpack_dual(model(fwAD.make_dual(x[0], tangent))).tangent)
    torch.testing.assert_close(jvps[1], jvps[0], rtol=1e-4, atol=1e-4)
    model = patch(resnet18(num_classes=10)).double()  # (fp32 through 20 batch norms drifted past 1e-4)
    replace_all_batch_norm_modules_(model)
    _per_sample_grads_match_one_at_a_time(model, torch.randn(2, 3, 64, 64, dtype=torch.float64),
                                          torch.randint(0, 10, (2,)), F.cross_entropy, 1e-9)


def _per_sample_grads(model, args):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, *sample):
        out = functional_call(model, p, tuple(a[None] for a in sample))
        return out[0] if isinstance(out, tuple) else out

    with sdpa_kernel(SDPBackend.MATH):
        return vmap(grad(loss), in_dims=(None,) + (0,) * len(args))(params, *args)


def test_bert_and_transformer_per_sample_gradients_match_their_stock_twins():
    """Padding masks and key lengths inside vmap: their models' value checks step aside there (no value can be
    read) and BERT's mask takes its per-key form."""
    from dlcore.models.bert import BertConfig, BertForSequenceClassification
    from dlcore.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    bert_args = (torch.randint(0, 50, (3, 9), generator=gen), torch.zeros(3, 9, dtype=torch.long), mask,
                 torch.randint(0, 2, (3,), generator=gen))
    tcfg = TransformerConfig(src_vocab=30, tgt_vocab=30, d_model=16, n_heads=2, d_ff=32, enc_layers=1, dec_layers=1,
                             dropout=0.0, max_len=32)
    transformer_args = (torch.randint(1, 30, (3, 7), generator=gen), torch.tensor([7, 5, 3]),
                        torch.randint(1, 30, (3, 6), generator=gen), torch.tensor([6, 6, 2]),
                        torch.randint(1, 30, (3, 6), generator=gen))
    for make, args in ((lambda stock: BertForSequenceClassification(cfg, stock=stock), bert_args),
                       (lambda stock: Transformer(tcfg, stock=stock), transformer_args)):
        ours, twin = (m.eval() for m in twins(make))
        got, want = _per_sample_grads(ours, args), _per_sample_grads(twin, args)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-10, msg=k)


DROPOUTS = {
    "dropout": lambda x: D.dropout(x, 0.5),
    "bias_act": lambda x: D.bias_act(x, torch.full((8,), 0.5), "relu", 0.5),
    "attention": lambda x: D.scaled_dot_product_attention(x[None], x[None], x[None], dropout_p=0.5)[0],
}


@pytest.mark.parametrize("name", DROPOUTS)
def test_dropout_under_vmap_follows_torchs_randomness_modes(name):
    """vmap's randomness: 'error' raises as for torch's dropout, 'same' gives every sample one mask, 'different'
    one each (the Philox seed, one integer, cannot be drawn per sample: torch's RNG draws the mask there), and
    grad_and_value under 'different' returns each sample's own mask in its gradient."""
    fn = DROPOUTS[name]
    x = torch.randn(1, 4, 8).expand(3, 4, 8).contiguous() + 3.0  # three equal samples, nothing near ReLU's 0
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(fn)(x)
    same, different = vmap(fn, randomness="same")(x), vmap(fn, randomness="different")(x)
    assert torch.equal(same[0], same[1]) and torch.equal(same[1], same[2])
    assert not torch.equal(different[0], different[1])
    if name != "attention":  # value Σ keep·(x + b)/(1 − p) and gradient keep/(1 − p) from one forward each
        grads, values = vmap(torch.func.grad_and_value(lambda t: fn(t).sum()), randomness="different")(x)
        assert not torch.equal(grads[0], grads[1])
        shifted = x + (0.5 if name == "bias_act" else 0.0)
        torch.testing.assert_close(values, (grads * shifted).sum((1, 2)))
        assert set(grads.unique().tolist()) == {0.0, 2.0}
