"""conv2d_relu (dlcore/ops/conv_relu.py): every backend against a float64 reference, NCHW and channels_last, odd
shapes, every gradient; gradcheck; opcheck; torch.compile; the module; bad input."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore.functional import conv2d_relu
from dlcore.nn import Conv2dReLU
from dlcore.ops.conv_relu import FORWARD, conv2d_relu_op
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
# (N, C_in, H, W, C_out, kernel, stride, padding, dilation, groups): AlexNet conv1-like, DQN conv1-like, odd sizes
SHAPES = [(2, 3, 35, 29, 5, 11, 4, 2, 1, 1), (1, 4, 84, 84, 16, 8, 4, 0, 1, 1), (3, 6, 7, 9, 4, 3, 1, 1, 2, 2),
          (1, 1, 1, 1, 7, 1, 1, 0, 1, 1), (4, 8, 13, 5, 129, 3, 2, 1, 1, 1)]
TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


# every (backend, device, dtype) that can run here: the CPU twin is fp32 only, the reference takes fp64 too
CASES = [(b, d, t) for t in (torch.float32, torch.float64) for b, d in backend_device_pairs(FORWARD, t)]


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True)])
def test_forward_backward_match_float64(backend, device, dtype, shape, channels_last, bias, residual):
    n, cin, h, w, cout, k, s, p, d, g = shape
    gen = torch.Generator().manual_seed(SEED + sum(shape))
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(cout, cin // g, k, k, generator=gen, dtype=torch.float64) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    out_shape = F.conv2d(x, wt, None, s, p, d, g).shape
    r = torch.randn(out_shape, generator=gen, dtype=torch.float64) if residual else None
    ref_inputs = [t.clone().requires_grad_() for t in (x, wt) + ((b,) if bias else ()) + ((r,) if residual else ())]
    z_ref = F.conv2d(*ref_inputs[:2], ref_inputs[2] if bias else None, s, p, d, g)
    y_ref = F.relu(z_ref + ref_inputs[-1] if residual else z_ref)
    grad = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    pre = z_ref + ref_inputs[-1] if residual else z_ref  # no upstream gradient near the ReLU kink (fp32 may flip it)
    grad = torch.where(pre.detach().abs() < 1e-3, 0.0, grad)
    refs = torch.autograd.grad(y_ref, ref_inputs, grad)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [x.to(device, dtype).contiguous(memory_format=fmt).requires_grad_(),
              wt.to(device, dtype).requires_grad_()] + ([b.to(device, dtype).requires_grad_()] if bias else [])
    if residual:  # the residual in the other layout than the input: converted, not mis-read
        other = torch.contiguous_format if channels_last else torch.channels_last
        inputs.append(r.to(device, dtype).contiguous(memory_format=other).requires_grad_())
    with dlcore.use_backend(backend):
        y = conv2d_relu(inputs[0], inputs[1], inputs[2] if bias else None, s, p, d, g,
                        residual=inputs[-1] if residual else None)
        grads = torch.autograd.grad(y, inputs, grad.to(device, dtype))
    scale = 1 + y_ref.abs().max().item()
    assert (y.double().cpu() - y_ref).abs().max().item() <= TOL[dtype] * scale
    for got, want, name in zip(grads, refs, ("input", "weight", "bias" if bias else "residual", "residual")):
        err = (got.double().cpu() - want).abs().max().item()
        assert err <= TOL[dtype] * (1 + want.abs().max().item()), f"grad {name}: {err}"


# (N, C_in, H, W, C_out, (kH, kW), (sH, sW), (pH, pW)): AlexNet/DQN-like, non-square, KW·C = 64 (8 vectors),
# stride past the kernel (rows and columns no window reaches: dx 0), 1×1, 129 output channels
FEW_CHANNEL_GEOMETRIES = [(2, 3, 35, 29, 5, (11, 11), (4, 4), (2, 2)), (1, 1, 9, 12, 3, (5, 3), (1, 2), (2, 0)),
                          (3, 4, 17, 19, 7, (16, 16), (3, 3), (1, 1)), (2, 2, 10, 11, 4, (2, 2), (3, 3), (0, 0)),
                          (1, 3, 1, 1, 2, (1, 1), (1, 1), (0, 0)), (2, 3, 13, 11, 129, (3, 3), (2, 1), (1, 1))]


@pytest.mark.skipif(dlcore._ext.cpu is None, reason="CPU extension not built")
@pytest.mark.parametrize("geometry", FEW_CHANNEL_GEOMETRIES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_few_channel_input_grad_matches_float64(geometry, channels_last, monkeypatch):
    """The CPU backends' dx for C_in ≤ 4 (csrc/cpu/conv_input_grad.cpp; dw still torch's) against float64."""
    from dlcore.ops import conv_relu

    n, c, h, w, co, k, s, p = geometry
    gen = torch.Generator().manual_seed(SEED + sum(geometry[:5]))
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    wt = torch.randn(co, c, *k, generator=gen, dtype=torch.float64)
    dz = torch.randn(F.conv2d(x, wt, None, s, p).shape, generator=gen, dtype=torch.float64)
    want_dx, want_dw, _ = torch.ops.aten.convolution_backward(dz, x, wt, None, s, p, [1, 1], False, [0, 0], 1,
                                                              [True, True, False])
    asked = []
    torch_grads = conv_relu._conv_grads
    monkeypatch.setattr(conv_relu, "_conv_grads", lambda *a: asked.append(a[-1]) or torch_grads(*a))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x32 = x.float().contiguous(memory_format=fmt)
    dx, dw = conv_relu.cpu_conv_grads(dz.float().contiguous(memory_format=fmt), x32, wt.float(), list(s), list(p),
                                      [1, 1], 1, (True, True))
    assert asked == [(False, True)]  # torch was asked for dw only
    assert dx.is_contiguous(memory_format=fmt) and dx.dtype == torch.float32
    for name, got, want in (("dx", dx, want_dx), ("dw", dw, want_dw)):
        err = (got.double() - want).abs().max().item()
        assert err <= 2e-5 * (1 + want.abs().max().item()), f"{name}: {err}"
    if s[0] > k[0]:  # rows no window reaches get exactly 0
        assert torch.equal(dx[:, :, k[0]:s[0]], torch.zeros_like(dx[:, :, k[0]:s[0]]))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: conv2d_relu(*a, stride=1, padding=1), (x, w, b))


def test_second_derivative_gradgradcheck_float64():
    """A backward with create_graph=True (a gradient penalty on a conv discriminator, double backprop) takes the
    differentiable formula (torch raised before: the kernels' backward has no second derivative): gradgradcheck
    with bias and residual, strided and grouped, and with only some inputs needing gradients."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    b, r = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(2, 6, 4, 3, generator=gen,
                                                                          dtype=torch.float64)
    conv = dict(stride=2, padding=1, groups=2)
    ins = tuple(t.clone().requires_grad_() for t in (x, w, b, r))
    dy = torch.randn(2, 6, 4, 3, generator=gen, dtype=torch.float64)
    first = torch.autograd.grad(conv2d_relu(*ins[:3], **conv, residual=ins[3]), ins, dy)  # the kernels'
    again = torch.autograd.grad(conv2d_relu(*ins[:3], **conv, residual=ins[3]), ins, dy, create_graph=True)
    for a, c in zip(first, again):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradgradcheck(lambda x, w, b, r: conv2d_relu(x, w, b, **conv, residual=r),
                                        tuple(t.clone().requires_grad_() for t in (x, w, b, r)))
    assert torch.autograd.gradgradcheck(lambda x: conv2d_relu(x, w, None, **conv), (x.clone().requires_grad_(),))
    assert torch.autograd.gradgradcheck(lambda w: conv2d_relu(x, w, b, **conv), (w.clone().requires_grad_(),))


def test_opcheck_and_compile():
    x, w, b = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.library.opcheck(conv2d_relu_op, (x, w, b, None, [1, 1], [1, 1], [1, 1], 1))
    compiled = torch.compile(lambda x, w, b: conv2d_relu(x, w, b, padding=1).sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), F.relu(F.conv2d(x, w, b, padding=1)).sum(), rtol=1e-4, atol=1e-4)


def test_module_is_a_drop_in_conv2d():
    conv, relu = torch.nn.Conv2d(3, 8, 5, stride=2, padding=2), torch.nn.ReLU()
    fused = Conv2dReLU(3, 8, 5, stride=2, padding=2)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 31, 17)
    torch.testing.assert_close(fused(x), relu(conv(x)))
    shared = Conv2dReLU.from_modules(conv, relu)
    assert shared.weight is conv.weight
    torch.testing.assert_close(shared(x), relu(conv(x)))
    torch.testing.assert_close(fused(x[0]), relu(conv(x[0])))  # unbatched input


def test_bad_input():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="groups"):
        conv2d_relu(x, w, groups=3)
    with pytest.raises(ValueError, match="weight must be 4-D"):
        conv2d_relu(x, w[0])
    with pytest.raises(ValueError, match="input must be"):
        conv2d_relu(x[0, 0], w)
    with pytest.raises(TypeError, match="weight is torch.float64"):
        conv2d_relu(x, w.double())
    with pytest.raises(TypeError, match="floating-point"):
        conv2d_relu(x.long(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d_relu(x, w, torch.zeros(5))
    for backend in ("cpu", "triton", "reference"):  # triton's kernel would have returned an empty tensor
        with dlcore.use_backend(backend), pytest.raises(ValueError, match="output would be empty"):
            conv2d_relu(torch.randn(1, 4, 2, 2), w)  # the kernel is larger than the padded input
        with dlcore.use_backend(backend), pytest.raises(ValueError, match="output would be empty"):
            conv2d_relu(torch.randn(1, 4, 5, 5), w, dilation=3)
    with pytest.raises(ValueError, match="padding must be 'same', 'valid' or integers"):
        conv2d_relu(x, w, padding="full")
    with pytest.raises(ValueError, match="strided"):
        conv2d_relu(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="bias must have shape"):  # a 2-D bias with the right element count
        conv2d_relu(x, w, torch.zeros(1, 6))
    with pytest.raises(TypeError, match="bias is torch.float64"):
        conv2d_relu(x, w, torch.zeros(6, dtype=torch.float64))


def test_conv_arguments_as_ints_tuples_or_lists():
    """conv_pairs keeps its results for hashable arguments: the same call in every spelling gives one result, and
    a bad value raises every time (never cached)."""
    x, w, b = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3), torch.randn(6)
    want = F.relu(F.conv2d(x, w, b, 2, 1))
    for stride, padding in ((2, 1), ((2, 2), (1, 1)), ([2, 2], [1, 1]), ((2, 2), 1)):
        for _ in range(2):
            torch.testing.assert_close(conv2d_relu(x, w, b, stride, padding), want)
    torch.testing.assert_close(conv2d_relu(x, w, b, (2, 1), (1, 0)), F.relu(F.conv2d(x, w, b, (2, 1), (1, 0))))
    for _ in range(2):
        with pytest.raises(ValueError, match="stride must be at least 1"):
            conv2d_relu(x, w, b, (0, 1))
        with pytest.raises(ValueError, match="padding must be at least 0"):
            conv2d_relu(x, w, b, 1, -1)


@pytest.mark.parametrize("kernel,dilation", [((3, 3), 1), ((4, 2), 1), ((2, 5), (2, 1)), ((1, 1), 3)])
def test_string_padding_matches_torch(kernel, dilation):
    """padding='same' (odd and even kernels: the odd pad on the bottom/right, as torch) and 'valid', in
    conv2d_relu and conv2d_relu_maxpool2d, forward and every gradient in float64."""
    from dlcore.functional import conv2d_relu_maxpool2d

    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(2, 3, 9, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, *kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    for padding in ("same", "valid"):
        chains = ((lambda *a: conv2d_relu(*a, padding=padding, dilation=dilation),
                   lambda *a: F.relu(F.conv2d(*a, padding=padding, dilation=dilation))),
                  (lambda *a: conv2d_relu_maxpool2d(*a, 1, padding, dilation, 1, 2, 1),
                   lambda *a: F.max_pool2d(F.relu(F.conv2d(*a, 1, padding, dilation)), 2, 1)))
        for ours, stock in chains:
            ins_a = [t.clone().requires_grad_() for t in (x, w, b)]
            ins_b = [t.clone().requires_grad_() for t in (x, w, b)]
            ya, yb = ours(*ins_a), stock(*ins_b)
            assert ya.shape == yb.shape
            torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
            g = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
            for ga, gb in zip(torch.autograd.grad(ya, ins_a, g), torch.autograd.grad(yb, ins_b, g)):
                torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_module_padding_modes_match_torch(padding_mode, padding):
    """Conv2dReLU / Conv2dReLUMaxPool2d with nn.Conv2d's non-zero padding modes: the input padded first (as
    nn.Conv2d does), outputs and gradients of the input and parameters as torch's, float64."""
    from dlcore.nn import Conv2dReLUMaxPool2d

    torch.manual_seed(SEED % 10007)
    conv = torch.nn.Conv2d(3, 4, (3, 4) if padding == "same" else 3, padding=padding, padding_mode=padding_mode)
    conv = conv.double()
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    stock_chains = (lambda a: F.relu(conv(a)), lambda a: F.max_pool2d(F.relu(conv(a)), 3, 2))
    for fused_type, stock in zip((Conv2dReLU, Conv2dReLUMaxPool2d), stock_chains):
        fused = fused_type(3, 4, conv.kernel_size, padding=padding, padding_mode=padding_mode,
                           **({"pool_stride": 2} if fused_type is Conv2dReLUMaxPool2d else {})).double()
        fused.load_state_dict(conv.state_dict())
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), stock(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (xa, fused.weight, fused.bias), g)
        gb = torch.autograd.grad(yb, (xb, conv.weight, conv.bias), g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
