"""conv2d_relu_maxpool2d (dlcore/ops/conv_pool.py): every backend against float64 F.max_pool2d(F.relu(F.conv2d()))
on fresh inputs — overlapping pools (AlexNet's 3×3/2), padding, ceil_mode, NCHW and channels_last, odd shapes —
every gradient; ties and NaN as torch; gradcheck; opcheck; torch.compile; the module; bad input."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore.functional import conv2d_relu, conv2d_relu_maxpool2d
from dlcore.nn import Conv2dReLUMaxPool2d
from dlcore.ops import conv_pool
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
# (N, C_in, H, W, C_out, k, stride, pad, groups, pool_k, pool_stride, pool_pad, ceil_mode)
SHAPES = [(2, 3, 35, 29, 5, 11, 4, 2, 1, 3, 2, 0, False),     # AlexNet conv1-like, overlapping 3×3/2
          (1, 4, 17, 17, 7, 3, 1, 1, 1, 3, 2, 1, True),       # ResNet-stem-like pool with padding, ceil_mode
          (3, 6, 9, 12, 4, 3, 1, 1, 2, 2, None, 0, False),    # groups, non-overlapping 2×2
          (1, 2, 8, 8, 129, 1, 1, 0, 1, (2, 3), (1, 2), (1, 0), True),
          (2, 1, 5, 5, 3, 3, 1, 0, 1, 3, 1, 0, False)]        # a 3×3 output pooled to 1×1
CASES = [(b, d, t) for t in (torch.float32, torch.float64) for b, d in backend_device_pairs(conv_pool.FORWARD, t)]


def _stock(x, w, b, shape):
    *_, k, s, p, g, pk, ps, pp, ceil = shape
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, s, p, 1, g)), pk, ps, pp, 1, ceil)


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_float64_reference(backend, device, dtype, shape, channels_last):
    n, cin, h, w, cout, k, s, p, g, pk, ps, pp, ceil = shape
    gen = torch.Generator().manual_seed(SEED + n * h + cout)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(cout, cin // g, k, k, generator=gen, dtype=torch.float64) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (x, wt, b)]
    want = _stock(*ref, shape)
    dy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    dy = torch.where(want.detach() < 1e-3, 0.0, dy)  # none at or near the ReLU kink (fp32 rounding may flip it)
    grads_want = torch.autograd.grad(want, ref, dy)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = [x.to(device, dtype).contiguous(memory_format=fmt).requires_grad_(), wt.to(device, dtype).requires_grad_(),
            b.to(device, dtype).requires_grad_()]
    with dlcore.use_backend(backend):
        y = conv2d_relu_maxpool2d(ours[0], ours[1], ours[2], s, p, 1, g, pk, ps, pp, ceil)
        grads = torch.autograd.grad(y, ours, dy.to(device, dtype))
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    if device == "cuda" and dtype == torch.float32 and backend in ("triton", "cuda"):
        tol = 5e-3  # the fused forwards run fp32 as tf32 (10-bit mantissa), as cuDNN does by default
    assert y.shape == want.shape
    assert (y.double().cpu() - want).abs().max().item() <= tol * (1 + want.abs().max().item())
    for got, ref_grad, name in zip(grads, grads_want, ("input", "weight", "bias")):
        err = (got.double().cpu() - ref_grad).abs().max().item()
        assert err <= tol * (1 + ref_grad.abs().max().item()), name


# the fused implicit-GEMM forwards: kernels/conv_pool.py v2 (triton) and csrc/cuda/conv_pool.cu (cuda)
FUSED = [(b, d) for b, d in backend_device_pairs(conv_pool.FORWARD, torch.float32) if b in ("triton", "cuda")]


@pytest.mark.skipif(not FUSED, reason="neither triton nor a CUDA device is available")
@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_implicit_gemm_with_dilation_and_low_precision(backend, device, dtype, channels_last):
    """The fused implicit-GEMM forward with stride, padding and dilation, Cin wider than one K block (70 > 64), in
    fp32 (tf32 on a GPU)/bf16/fp16: its error against float64 at most twice stock PyTorch's own in that dtype on
    that device (plus a few ulps), and the argmax routes the gradient as torch does."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 70, 19, 23, generator=gen).to(device, dtype)
    w = (torch.randn(9, 70, 3, 3, generator=gen) / 25).to(device, dtype)
    b = torch.randn(9, generator=gen).to(device, dtype)
    conv = dict(stride=(2, 1), padding=(1, 2), dilation=(2, 3))
    pool = dict(pool_kernel_size=3, pool_stride=2, pool_padding=1)
    want = F.max_pool2d(F.relu(F.conv2d(x.double(), w.double(), b.double(), **conv)), 3, 2, 1)
    stock = F.max_pool2d(F.relu(F.conv2d(x, w, b, **conv)), 3, 2, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with dlcore.use_backend(backend):
        y = conv2d_relu_maxpool2d(x, w, b, **conv, **pool)
    assert y.shape == want.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    eps = torch.finfo(dtype).eps * 4 * (1 + want.abs().max().item())
    assert (y.double() - want).abs().max().item() <= 2 * (stock.double() - want).abs().max().item() + eps
    if dtype == torch.float32 and device == "cpu":  # gradients through the saved argmax, against stock's
        xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        ys = F.max_pool2d(F.relu(F.conv2d(xs, ws, b, **conv)), 3, 2, 1)
        dy = torch.randn(ys.shape, generator=gen)
        dy = torch.where(ys.detach() < 1e-3, 0.0, dy)
        gs = torch.autograd.grad(ys, (xs, ws), dy)
        xo, wo = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        with dlcore.use_backend(backend):
            go = torch.autograd.grad(conv2d_relu_maxpool2d(xo, wo, b, **conv, **pool), (xo, wo), dy)
        for got, ref in zip(go, gs):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", backend_device_pairs(conv_pool.FORWARD, torch.float32))
def test_ties_and_nan_follow_torch(backend, device):
    """A constant input makes every window a tie (torch routes the gradient to the first maximum); a NaN wins."""
    x = torch.ones(1, 1, 6, 6, requires_grad=True)
    w = torch.ones(1, 1, 1, 1, requires_grad=True)
    with dlcore.use_backend(backend):
        y = conv2d_relu_maxpool2d(x, w, None, pool_kernel_size=3, pool_stride=2)
        (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(F.max_pool2d(F.relu(F.conv2d(x2, w.detach())), 3, 2).sum(), x2)
    torch.testing.assert_close(gx, want)
    nan = torch.ones(1, 1, 6, 6)
    nan[0, 0, 2, 2] = float("nan")
    with dlcore.use_backend(backend):
        y = conv2d_relu_maxpool2d(nan, w.detach(), None, pool_kernel_size=3, pool_stride=2)
    assert torch.equal(y.isnan(), F.max_pool2d(nan, 3, 2).isnan())


def test_saves_pooled_output_and_byte_argmax_only():
    x, w = torch.randn(2, 3, 20, 20, requires_grad=True), torch.randn(8, 3, 3, 3, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv2d_relu_maxpool2d(x, w, None, padding=1, pool_kernel_size=2)
    assert sorted(tuple(t.shape) for t in saved if t.dim() == 4) == sorted([tuple(x.shape), tuple(w.shape),
                                                                           tuple(y.shape), tuple(y.shape)])
    assert any(t.dtype == torch.uint8 for t in saved)


def test_gradcheck_opcheck_compile():
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 2, 7, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: conv2d_relu_maxpool2d(*a, pool_kernel_size=2, pool_stride=1), (x, w, b))
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    conf = ([1, 1], [0, 0], [1, 1], 1, [3, 3], [2, 2], [0, 0], False)
    torch.library.opcheck(conv_pool.conv2d_relu_maxpool2d_op, (x32, w32, b32, *conf, True))
    # keep_argmax False (inference) on inputs wanting no gradient, as the public function passes it
    torch.library.opcheck(conv_pool.conv2d_relu_maxpool2d_op, (x32.detach(), w32.detach(), b32.detach(), *conf, False))
    fn = torch.compile(lambda x, w, b: conv2d_relu_maxpool2d(x, w, b, pool_kernel_size=3, pool_stride=2).sum(),
                       fullgraph=True)
    torch.testing.assert_close(fn(x32, w32, b32), F.max_pool2d(F.relu(F.conv2d(x32, w32, b32)), 3, 2).sum())


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c[2] == torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups", [1, 2])  # (triton: the fused implicit-GEMM forward, torch's conv + pool kernel)
def test_inference_keeps_no_argmax_and_matches_training_forward(backend, device, dtype, channels_last, groups):
    """Without a gradient wanted the forward keeps no pool argmax (the CPU epilogue, the Triton and CUDA kernels
    then write no offsets); y is the training forward's, bit for bit; a backward through an argmax-free forward
    raises instead of guessing."""
    gen = torch.Generator().manual_seed(SEED)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, 23, 19, generator=gen).to(device).contiguous(memory_format=fmt)
    w = torch.randn(8, 6 // groups, 3, 3, generator=gen).to(device) / 6
    b = torch.randn(8, generator=gen).to(device)
    conf = ([2, 2], [1, 1], [1, 1], groups, [3, 3], [2, 2], [0, 0], False)
    with dlcore.use_backend(backend):
        y_train, argmax = conv_pool.conv2d_relu_maxpool2d_op(x, w, b, *conf, True)
        y_infer, none = conv_pool.conv2d_relu_maxpool2d_op(x, w, b, *conf, False)
        with torch.no_grad():
            y_public = conv2d_relu_maxpool2d(x.requires_grad_(), w, b, 2, 1, 1, groups, pool_kernel_size=3,
                                             pool_stride=2)
        y_nograd_inputs = conv2d_relu_maxpool2d(x.detach(), w, b, 2, 1, 1, groups, pool_kernel_size=3,
                                                pool_stride=2)
        assert argmax.shape == y_train.shape and none.numel() == 0
        for y in (y_infer, y_public, y_nograd_inputs):
            assert torch.equal(y, y_train) and y.stride() == y_train.stride()
        y_bad, _ = conv_pool._conv2d_relu_maxpool2d(x, w.requires_grad_(), b, *conf, False)
        with pytest.raises(RuntimeError, match="kept no pool argmax"):
            y_bad.sum().backward()


def test_module_is_a_drop_in():
    conv, pool = torch.nn.Conv2d(3, 8, 5, stride=2, padding=2), torch.nn.MaxPool2d(3, 2)
    fused = Conv2dReLUMaxPool2d(3, 8, 5, stride=2, padding=2, pool_kernel_size=3, pool_stride=2)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 31, 17)
    torch.testing.assert_close(fused(x), pool(F.relu(conv(x))))
    shared = Conv2dReLUMaxPool2d.from_modules(conv, torch.nn.ReLU(), pool)
    assert shared.weight is conv.weight
    torch.testing.assert_close(shared(x), pool(F.relu(conv(x))))
    with pytest.raises(TypeError, match="MaxPool2d"):
        Conv2dReLUMaxPool2d.from_modules(conv, torch.nn.ReLU(), torch.nn.AvgPool2d(2))


def test_bad_input():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        conv2d_relu_maxpool2d(x, w, groups=3)
    with pytest.raises(ValueError, match="input must be"):
        conv2d_relu_maxpool2d(x[0, 0], w)
    with pytest.raises(ValueError, match="larger than the padded"):
        conv2d_relu_maxpool2d(x, w, pool_kernel_size=7)
    with pytest.raises(ValueError, match="at most half"):
        conv2d_relu_maxpool2d(x, w, padding=1, pool_kernel_size=2, pool_padding=2)
    with pytest.raises(ValueError, match="convolution's output would be empty"):
        conv2d_relu_maxpool2d(torch.randn(1, 4, 2, 2), w)
    with pytest.raises(TypeError, match="weight is torch.float64"):
        conv2d_relu_maxpool2d(x, w.double())
    empty = torch.randn(0, 4, 8, 8, requires_grad=True)  # an empty batch: torch's (empty) result, with a graph
    got = conv2d_relu_maxpool2d(empty, w)
    assert got.shape == F.max_pool2d(F.relu(F.conv2d(empty, w)), 3, 3).shape and got.grad_fn is not None
    for bad, match in [(dict(stride=0), r"stride must be at least 1, got \(0, 0\)"),
                       (dict(padding=(1, -1)), r"padding must be at least 0, got \(1, -1\)"),
                       (dict(dilation=0), "dilation must be at least 1")]:
        with pytest.raises(ValueError, match=match):
            conv2d_relu_maxpool2d(x, w, **bad)
        with pytest.raises(ValueError, match=match):
            conv2d_relu(x, w, **bad)


@pytest.mark.skipif(dlcore._ext.cpu is None, reason="CPU extension not built")
@pytest.mark.parametrize("shape,pool", [((2, 64, 112, 112), (3, 2, 1, False)), ((3, 19, 7, 9), (3, 2, 1, True)),
                                        ((1, 5, 1, 1), (1, 1, 0, False)), ((2, 33, 17, 13), (2, 2, 0, True))])
def test_inference_pool_without_argmax_equals_torch(shape, pool):
    """The folded ResNet stem's pool in inference (the C++ epilogue keeping no offsets), against F.max_pool2d on
    a non-negative channels-last input with NaNs and ties; and the folded stem end to end against the stock stem."""
    kernel, stride, padding, ceil = pool
    gen = torch.Generator().manual_seed(SEED)
    z = torch.rand(shape, generator=gen).mul(4).floor()  # ties
    z.view(-1)[torch.randint(0, z.numel(), (max(1, z.numel() // 50),), generator=gen)] = float("nan")
    z = z.contiguous(memory_format=torch.channels_last)
    module = torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil)
    got = conv_pool.cpu_maxpool_inference(z, module)
    want = F.max_pool2d(z, kernel, stride, padding, ceil_mode=ceil)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    if shape[2] * shape[3] > 1:  # (a 1×1 image is both layouts)
        assert conv_pool.cpu_maxpool_inference(z.contiguous(), module) is None  # NCHW: the caller pools with torch


def test_folded_stem_with_the_inference_pool_matches_stock():
    from dlcore import blocks

    gen = torch.Generator().manual_seed(SEED)
    stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        stem[1].running_mean.uniform_(-1, 1, generator=gen)
        stem[1].running_var.uniform_(0.5, 2, generator=gen)
    pool = torch.nn.MaxPool2d(3, 2, 1)
    folded = blocks.FoldedConv2d.fold(stem[0], stem[1], relu=True, pool=pool)
    x = torch.randn(2, 3, 45, 37, generator=gen).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = pool(torch.relu(stem(x)))
        got = folded(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c[2] == torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "hw_transposed", "sliced_channels_last"])
def test_output_memory_format_is_torchs(backend, device, dtype, layout):
    """The output has the strides torch's conv → relu → pool chain gives the same input: channels-last only for
    a dense channels-last input. A transposed view counted as channels-last (its channel stride was not
    checked), and its result could not be .view()ed."""
    g = torch.Generator().manual_seed(SEED)
    base = torch.randn(2, 11, 13, 6, generator=g, dtype=dtype)
    x = {"nchw": base.permute(0, 3, 1, 2).contiguous(),
         "channels_last": base.permute(0, 3, 1, 2),
         "hw_transposed": base.permute(0, 3, 2, 1),
         "sliced_channels_last": base[:, :, :, :5].permute(0, 3, 1, 2)}[layout].to(device)
    w = torch.randn(4, x.shape[1], 3, 3, generator=g, dtype=dtype).to(device)
    with dlcore.use_backend(backend):
        y = conv2d_relu_maxpool2d(x, w, None, padding=1, pool_kernel_size=2)
    want = F.max_pool2d(F.relu(F.conv2d(x, w, None, 1, 1)), 2)
    assert y.stride() == want.stride()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
