"""dlcore.patch and dlcore.fuse_for_inference on models that are not dlcore's: Sequential runs, class swaps,
what is left alone. Every check compares the patched model with an unpatched copy in float64 (outputs, every
parameter's gradient, batch-norm running statistics), and checks that the swaps happened."""
import copy

import pytest
import torch
from torch import nn

import dlcore
from dlcore import nn as dnn
from dlcore.blocks import FoldedConv2d
from dlcore.models.alexnet import alexnet


def _cnn(p_drop: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),  # → Conv2dReLUMaxPool2d
        nn.Conv2d(8, 12, 3, bias=False), nn.BatchNorm2d(12), nn.ReLU(),             # BN + ReLU fused
        nn.Conv2d(12, 12, 1), nn.ReLU(),                                            # → Conv2dReLU
        nn.Conv2d(12, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(),           # → Conv2dReLU (pads first)
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),                   # BN + LeakyReLU fused
        nn.Flatten(),
        nn.Sequential(nn.Linear(6 * 6 * 6, 32), nn.ReLU(), nn.Dropout(p_drop),       # nested: → LinearReLUDropout
                      nn.Linear(32, 16), nn.GELU(approximate="tanh"),               # → LinearGELU
                      nn.LayerNorm(16), nn.Linear(16, 5)))


def _compare(ours: nn.Module, stock: nn.Module, x: torch.Tensor, tol: float = 1e-10) -> None:
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), stock(xb)
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), stock.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=tol, atol=tol, msg=name)
    for (name, ba), (_, bb) in zip(ours.named_buffers(), stock.named_buffers()):
        torch.testing.assert_close(ba, bb, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_sequential_runs_match_the_unpatched_model(training):
    torch.manual_seed(0)
    stock = _cnn().double().train(training)
    model = copy.deepcopy(stock)
    params = [p for p in model.parameters()]
    keys = list(model.state_dict())
    assert dlcore.patch(model) is model
    types = [type(m) for m in model[:13]]
    assert types == [dnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity, nn.Conv2d, dnn.BatchNorm2dReLU, nn.Identity,
                     dnn.Conv2dReLU, nn.Identity, dnn.Conv2dReLU, nn.Identity, nn.Conv2d, dnn.BatchNorm2dLeakyReLU,
                     nn.Identity]
    head = [type(m) for m in model[14]]
    assert head == [dnn.LinearReLUDropout, nn.Identity, nn.Identity, dnn.LinearGELU, nn.Identity, dnn.LayerNorm,
                    dnn.Linear]
    assert model[11].negative_slope == 0.2 and model[14][3].approximate == "tanh"
    assert list(model.state_dict()) == keys  # same keys, and the very same parameter tensors
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(m.training == training for m in model.modules())
    _compare(model, stock, torch.randn(4, 3, 17, 17, dtype=torch.float64))
    assert dlcore.patch(model) is model and [type(m) for m in model[:13]] == types  # twice: nothing more


def test_string_padding_and_padding_modes_are_fused():
    """Conv2d runs with padding='same' (an even kernel: the odd pad on the bottom/right) or a circular padding mode
    become fused layers, with the unpatched model's outputs and gradients."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.ReLU()).double()
    model = dlcore.patch(copy.deepcopy(stock))
    assert [type(m) for m in model] == [dnn.Conv2dReLUMaxPool2d, nn.Identity, nn.Identity, dnn.Conv2dReLU,
                                        nn.Identity]
    _compare(model, stock, torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_dropout_after_a_fused_linear_keeps_its_rate_and_mode():
    torch.manual_seed(0)
    model = dlcore.patch(_cnn(p_drop=0.5))
    fused = model[14][0]
    assert isinstance(fused, dnn.LinearReLUDropout) and fused.p == 0.5
    x = torch.randn(2, 3, 17, 17)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout draws a fresh mask per call in training
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_torch_alexnet_patched_is_dlcores_alexnet():
    """The stock twin (torchvision's module tree) patched: the same swaps dlcore's own AlexNet makes, same output."""
    torch.manual_seed(0)
    stock = alexnet(num_classes=10, dropout=0.0, stock=True).double()
    patched = dlcore.patch(copy.deepcopy(stock))
    ours = alexnet(num_classes=10, dropout=0.0).double()
    assert [type(m) for m in patched.features] == [type(m) for m in ours.features]
    assert [type(m) for m in patched.classifier][1:] == [type(m) for m in ours.classifier][1:]  # [0]: nn.Dropout
    _compare(patched, stock, torch.randn(2, 3, 67, 67, dtype=torch.float64))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layers_swap_layer_norm_and_attention(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=True)
    stock = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    model = dlcore.patch(copy.deepcopy(stock))
    kinds = {type(m) for m in model.modules()}
    assert dnn.MultiheadAttention in kinds and dnn.LayerNorm in kinds
    assert nn.LayerNorm not in kinds and nn.MultiheadAttention not in kinds
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(7, dtype=torch.float64)
    ya = model(x, mask=mask, is_causal=True)
    yb = stock(x, mask=mask, is_causal=True)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    _compare(model, stock, x)


def test_subclasses_and_custom_sequentials_are_left_alone():
    class MyConv(nn.Conv2d):  # a subclass may change forward: never swapped
        def forward(self, x):
            return super().forward(x) * 2

    class Residual(nn.Sequential):  # a Sequential with its own forward: its children are not a chain
        def forward(self, x):
            return x + super().forward(x)

    model = nn.Sequential(MyConv(3, 3, 1), nn.ReLU(), Residual(nn.Conv2d(3, 3, 1), nn.ReLU()),
                          nn.MaxPool2d(2, dilation=2), nn.Conv2d(3, 3, 1), nn.ReLU(), nn.MaxPool2d(2, dilation=2))
    before = [type(m) for m in model.modules()]
    x = torch.randn(1, 3, 9, 9)
    want = model(x)
    dlcore.patch(model)
    after = [type(m) for m in model.modules()]
    # only the last Conv2d + ReLU fuse (their pool has a dilation the fused op does not take)
    assert after == [t if i != 7 else dnn.Conv2dReLU for i, t in enumerate(before)][:8] + [nn.Identity, nn.MaxPool2d]
    torch.testing.assert_close(model(x), want)


@pytest.mark.parametrize("winograd", [False, True])
def test_fuse_for_inference_folds_sequential_conv_bn_runs(winograd):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU())
    for m in stock.modules():  # running statistics and affine parameters away from their defaults
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    stock = stock.double().eval()
    model = dlcore.fuse_for_inference(copy.deepcopy(stock), winograd=winograd)
    assert not model.training
    types = [type(m) for m in model]
    # the last run keeps its batch norm (no running statistics: nothing to fold), fused with its ReLU by patch()
    assert types == [FoldedConv2d, nn.Identity, nn.Identity, nn.Identity, FoldedConv2d, nn.Identity, nn.Identity,
                     FoldedConv2d, nn.Identity, nn.Conv2d, dnn.BatchNorm2dReLU, nn.Identity]
    assert model[0].pool is not None and model[4].relu and not model[7].relu
    with torch.no_grad():
        x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
        torch.testing.assert_close(model(x), stock(x), rtol=1e-9, atol=1e-9)


def test_dlcore_models_take_dlcore_linear_layers_and_twins_keep_torchs():
    from dlcore.models.bert import BertConfig, BertForSequenceClassification
    from dlcore.models.gpt import CONFIGS as GPT_CONFIGS, GPT
    from dlcore.models.transformer import CONFIGS as TF_CONFIGS, Transformer

    bert = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=16)
    for make in (lambda stock: GPT(GPT_CONFIGS["tiny"], stock=stock),
                 lambda stock: Transformer(TF_CONFIGS["small"], stock=stock),
                 lambda stock: BertForSequenceClassification(bert, stock=stock)):
        ours, twin = make(False), make(True)
        linears = [type(m) for m in ours.modules() if isinstance(m, nn.Linear)]
        assert linears and all(t is dnn.Linear for t in linears)
        assert all(type(m) is nn.Linear for m in twin.modules() if isinstance(m, nn.Linear))
        assert list(ours.state_dict()) == list(twin.state_dict())


def test_verbose_patch_says_what_it_swapped(capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 4))
    dlcore.patch(model, verbose=True)
    assert capsys.readouterr().out.strip() == "dlcore.patch: Conv2dReLUMaxPool2d ×1, Linear ×1"
    dlcore.patch(model, verbose=True)
    assert capsys.readouterr().out.strip() == "dlcore.patch: nothing to swap"


# ------------------------------------------------------------------------------ residual blocks and stems
def _warm_batch_norms(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, so a wrong fold shows."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.double()


def _stock_blocks():
    from dlcore.models import resnet as tv  # the stock twins: torchvision's module tree and forward

    class SqueezeExcite(tv.BasicBlock):  # a torchvision-named block with one more child: another forward
        def __init__(self, channels):
            super().__init__(channels, channels)
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1), nn.Sigmoid())

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out * self.se(out) + x)

    SqueezeExcite.__name__ = "BasicBlock"

    class Stem(nn.Module):  # a torchvision-style stem whose activation is chosen by the test
        def __init__(self, act):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act
            self.maxpool, self.layer1 = nn.MaxPool2d(3, 2, 1), nn.Sequential(tv.BasicBlock(8, 8))

        def forward(self, x):
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    class NoNormStem(nn.Module):  # conv1 and layer1 but no bn1 / relu (looking them up raised)
        def __init__(self):
            super().__init__()
            self.conv1, self.layer1 = nn.Conv2d(8, 8, 3, padding=1), nn.Sequential(tv.BasicBlock(8, 8))

        def forward(self, x):
            return self.layer1(self.conv1(x))

    group_norm, leaky = tv.BasicBlock(8, 8), tv.BasicBlock(8, 8)
    group_norm.bn1, group_norm.bn2 = nn.GroupNorm(2, 8), nn.GroupNorm(4, 8)
    leaky.relu = nn.LeakyReLU(0.1)
    resnet_d = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    return {  # name → (model, how many torchvision blocks dlcore.patch may convert)
        "a block itself": (tv.BasicBlock(8, 8), 0),  # it has conv1, bn1 and relu too, but is no stem
        "a bottleneck itself": (tv.Bottleneck(8, 2), 0),
        "squeeze-excite block": (nn.Sequential(SqueezeExcite(8)), 0),
        "group-norm block": (nn.Sequential(group_norm), 0),
        "leaky-relu block": (nn.Sequential(leaky), 0),
        "resnet-d shortcut": (nn.Sequential(tv.BasicBlock(8, 16, 2, resnet_d)), 0),
        "silu stem": (Stem(nn.SiLU()), 1),
        "identity stem": (Stem(nn.Identity()), 1),
        "relu stem": (Stem(nn.ReLU()), 1),
        "stem without norm": (NoNormStem(), 1),
    }


@pytest.mark.parametrize("case", list(_stock_blocks()))
@pytest.mark.parametrize("mode", ["patch-train", "patch-eval", "fuse"])
def test_blocks_and_stems_are_converted_only_when_they_compute_torchvisions_forward(case, mode):
    """Blocks are recognised by torchvision's class name and exactly its children; a stem by conv1 → bn1 → relu
    (exact types) in a model with layer1. Anything else runs as it was, and every model computes what it did."""
    torch.manual_seed(0)
    stock, convertible = _stock_blocks()[case]
    stock = _warm_batch_norms(stock).train(mode == "patch-train")
    model = copy.deepcopy(stock)
    model = dlcore.fuse_for_inference(model) if mode == "fuse" else dlcore.patch(model)
    kinds = {type(m).__name__ + "/" + type(m).__module__ for m in model.modules()}
    converted = sum(isinstance(m, (dnn.BasicBlock, dnn.Bottleneck)) for m in model.modules())
    assert converted == convertible, kinds
    if hasattr(stock, "layer1"):  # the stem: fused (patch) or folded with its pool (fuse) only when it is ReLU's
        fused_stem = (getattr(model.conv1, "pool", None) is not None if mode == "fuse"
                     else type(getattr(model, "bn1", None)) is dnn.BatchNorm2dReLU)
        assert fused_stem == (case == "relu stem")
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    if mode == "fuse":
        with torch.no_grad():
            torch.testing.assert_close(model(x), stock(x), rtol=1e-9, atol=1e-9)
    else:
        _compare(model, stock, x)


def test_fuse_for_inference_folds_grouped_dilated_bottlenecks_and_leaves_odd_shortcuts_unfolded():
    """ResNeXt-style grouped, dilated 3×3 convolutions fold; a dlcore block's ResNet-D shortcut (average pool
    first) is not folded by the block, but its Conv2d + BatchNorm2d run is folded as any Sequential run."""
    from dlcore.models import resnet as tv

    torch.manual_seed(0)
    grouped = tv.Bottleneck(8, 2)
    grouped.conv2 = nn.Conv2d(2, 2, 3, padding=2, dilation=2, groups=2, bias=False)
    shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    stock = _warm_batch_norms(nn.Sequential(grouped, dnn.BasicBlock(8, 16, 2, shortcut))).eval()
    model = dlcore.fuse_for_inference(copy.deepcopy(stock))
    assert isinstance(model[0], dnn.Bottleneck) and model[0].conv2.groups == 2 and model[0].conv2.dilation == (2, 2)
    assert [type(m) for m in model[1].downsample] == [nn.AvgPool2d, FoldedConv2d, nn.Identity]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rewrite", ["patch", "fuse"])
def test_modules_with_hooks_and_negative_leaky_slopes_are_left_alone(rewrite):
    """A hooked module is never replaced (its hook would be dropped, and what it observes may be fused away); a
    LeakyReLU with a negative slope (torch allows it; the fused backward does not) keeps its run unfused."""
    from dlcore.models import resnet as tv

    torch.manual_seed(0)
    seen = []
    head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.LeakyReLU(-0.2),
                         nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    body = nn.Sequential(tv.BasicBlock(8, 8), tv.BasicBlock(8, 8))
    stock = _warm_batch_norms(nn.Sequential(head, body)).eval()
    model = copy.deepcopy(stock)
    model[0][0].register_forward_hook(lambda m, i, out: seen.append("conv"))
    model[1][0].bn2.register_forward_pre_hook(lambda m, i: seen.append("bn2"))
    model[0][4].register_full_backward_hook(lambda m, gi, go: None)
    model = dlcore.fuse_for_inference(model) if rewrite == "fuse" else dlcore.patch(model)
    assert [type(m) for m in model[0][:4]] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.LeakyReLU]
    assert type(model[0][4]) is nn.Conv2d and type(model[0][5]) is not nn.BatchNorm2d  # (bn, relu) still fuse
    assert type(model[1][0]) is tv.BasicBlock and isinstance(model[1][1], dnn.BasicBlock)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(x), rtol=1e-9, atol=1e-9)
    assert seen == ["conv", "bn2"]


@pytest.mark.parametrize("winograd", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_convolutions_return_their_inputs_memory_format(winograd, channels_last):
    """nn.Conv2d returns NCHW for NCHW input, so callers .view() its output; the folded CPU paths (oneDNN,
    Winograd, the stem's pool) compute channels-last and must hand back the input's format."""
    torch.manual_seed(0)
    stock = _warm_batch_norms(nn.Sequential(
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),                        # oneDNN or Winograd
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))).float().eval()
    model = dlcore.fuse_for_inference(copy.deepcopy(stock), winograd=winograd)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 32, 24, 24).contiguous(memory_format=fmt)
    with torch.no_grad():
        for k in (2, 6, 8):  # the ends of the three folded runs
            y, want = model[:k + 1](x), stock[:k + 1](x)
            assert y.stride() == want.stride(), k
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        if not channels_last:
            y.view(2, -1)  # raised for the channels-last result before
    # residual blocks: the convolutions inside pass channels-last on, the block's result takes x's format
    from dlcore.models import resnet as tv

    shortcut = nn.Sequential(nn.Conv2d(32, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    stock = _warm_batch_norms(nn.Sequential(tv.BasicBlock(32, 64, 2, shortcut), tv.BasicBlock(64, 64))).float()
    model = dlcore.fuse_for_inference(copy.deepcopy(stock.eval()), winograd=winograd)
    assert isinstance(model[0].conv2, FoldedConv2d) and not model[0].conv1.caller_layout
    with torch.no_grad():
        for k in (0, 1):
            y, want = model[:k + 1](x), stock[:k + 1](x)
            assert y.stride() == want.stride(), k
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("winograd", [False, True])
def test_a_folded_model_that_has_run_copies_and_saves(winograd):
    """FoldedConv2d keeps oneDNN's packed weights (an opaque tensor) after its first call: copy.deepcopy and
    torch.save of the whole model raised until the caches were left out of its pickled state."""
    import io

    from dlcore.models import resnet as tv

    torch.manual_seed(0)
    model = dlcore.fuse_for_inference(_warm_batch_norms(tv.resnet18(num_classes=10, stock=True)).float(),
                                      winograd=winograd)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        for other in (copy.deepcopy(model), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
            torch.testing.assert_close(other(x), want, rtol=0, atol=0)


def test_a_folded_resnet_converts_its_input_to_channels_last_once():
    """Fed NCHW, a folded ResNet paid a layout copy into and out of every block (each gives its result its input's
    layout); fuse_for_inference now converts the input once on entry (a forward pre-hook), so the blocks see
    channels-last, and gives a 4-D result the input's layout back. The hooks' per-thread record of each call
    stays matched when a forward raises."""
    from dlcore import patching
    from dlcore.models import resnet as tv
    from dlcore.ops.batch_norm import is_channels_last

    class Backbone(tv.ResNet):  # a 4-D result: layer2's feature map
        def forward(self, x):
            return self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))

    torch.manual_seed(0)
    for stock in (_warm_batch_norms(tv.resnet18(num_classes=10, stock=True)).eval(),
                  _warm_batch_norms(Backbone("basic", [1, 1, 1, 1], stock=True, width=16)).eval()):
        model = dlcore.fuse_for_inference(copy.deepcopy(stock))
        seen = []
        model.layer1.register_forward_pre_hook(lambda m, args: seen.append(is_channels_last(args[0])))
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 3, 40, 40, dtype=torch.float64).contiguous(memory_format=fmt)
            with torch.no_grad():
                y, want = model(x), stock(x)
            torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
            assert y.stride() == want.stride()
        assert seen == [True, True]
        with pytest.raises((RuntimeError, ValueError)):
            model(torch.randn(2, 4, 40, 40, dtype=torch.float64))  # 4 channels for a 3-channel stem
        assert patching._converted_inputs.stack == []
