"""conv2d_relu_maxpool2d: y = maxpool(relu(conv2d(x, w) + b)), forward and backward (issue 3's fused op; the ResNet
stem of issue 6 is the same op after BN folding).

Max and ReLU commute and a per-channel bias is constant within a pooling window, so
    y = relu(maxpool(z) + b),  z = conv2d(x, w) without its bias,
and the epilogue works on the pooled tensor: one pass over z writes the pooled output and, per output, the byte
offset of its window's argmax. Backward (g = dy·[y > 0]): db = Σ g, dz = g scattered to each window's argmax
(overlapping windows add), then the convolution's backward. Saved for backward: x, w, the pooled y and the byte
argmax — not the full-size activation (stock saves the conv output, the ReLU output and int64 pool indices).

Launchers (every backend; geometry = (N, C, H, W, OH, OW, kH, kW, sH, sW, pH, pW) of the pool on z):
  forward(x, weight, bias, conv, pool) -> (y, argmax uint8)
  backward(grad_y, x, weight, y, argmax, has_bias, conv, pool, mask) -> (dx, dw, db)
Backends
  reference  the same function in plain PyTorch (F.max_pool2d with indices), every float dtype; the oracle.
  cpu        torch's convolution (oneDNN) + csrc/cpu/pool_epilogue.cpp, computed channels-last whatever the
             input's layout (fastest for both; y comes back in the input's layout); fp32/bf16/fp16.
  triton     forward (groups = 1): kernels/conv_pool.py's implicit-GEMM convolution with the pool/bias/ReLU epilogue
             fused (the un-pooled activation never in global memory; NCHW or channels_last read in place);
             grouped convolutions: torch's convolution (cuDNN on a GPU) + the Triton pool epilogue. Backward: the
             pool epilogue's gather (deterministic, no atomics), then torch's convolution backward.
  cuda       forward (groups = 1): csrc/cuda/conv_pool.cu, the same fused implicit GEMM on tensor cores (WMMA: tf32
             for fp32); grouped convolutions and backward: the reference's torch ops on the GPU.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dlcore import _dispatch, _eager, _ext
from dlcore.ops import batch_norm as channel_ops
from dlcore.ops.batch_norm import as_layout
from dlcore.ops.conv_relu import (_conv_grads, _pair, check_conv_args, check_groups, checked_output_shape,
                                  conv_output_shape, conv_pairs, cpu_conv_grads, string_padding)

FORWARD, BACKWARD = "conv2d_relu_maxpool2d", "conv2d_relu_maxpool2d_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton", "cuda"))  # neither measured on a GPU yet
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NO_POOL = (1, 1, 1, 1, 0, 0, False)  # a 1×1 window: the fused forwards as conv2d + bias + ReLU (conv_relu.py)


def _no_argmax(x: torch.Tensor) -> torch.Tensor:
    """The argmax output of a forward that kept none (keep_argmax False: no backward can follow)."""
    return x.new_empty(0, dtype=torch.uint8)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's max_pool2d output length: the last window must start inside the input or its left padding."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _geometry(z_shape, pool) -> tuple:
    kh, kw, sh, sw, ph, pw, ceil_mode = pool
    n, c, h, w = z_shape
    return (n, c, h, w, pool_output_size(h, kh, sh, ph, ceil_mode), pool_output_size(w, kw, sw, pw, ceil_mode),
            kh, kw, sh, sw, ph, pw)


# ---------------------------------------------------------------------------------------------------- reference
def _window_offsets(indices: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """torch's flat argmax (h·W + w in the input plane) → the offset within the window (kh·kW + kw), as bytes."""
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = geometry
    rows = torch.div(indices, w, rounding_mode="floor") - (torch.arange(oh, device=indices.device) * sh - ph)[:, None]
    cols = indices % w - (torch.arange(ow, device=indices.device) * sw - pw)
    return (rows * kw + cols).to(torch.uint8)


@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(x, weight, bias, conv, pool, keep_argmax=True):
    inside = bias is not None and bias.dtype == x.dtype  # torch's chain: the convolution adds it, before rounding
    z = F.conv2d(x, weight, bias if inside else None, *conv)
    geometry = _geometry(z.shape, pool)
    pooled, indices = F.max_pool2d(z, pool[:2], pool[2:4], pool[4:6], 1, pool[6], return_indices=True)
    if bias is not None and not inside:  # (a bias of another dtype: added in the pooled output's)
        pooled = pooled + bias.to(pooled.dtype)[:, None, None]
    return F.relu(pooled), _window_offsets(indices, geometry) if keep_argmax else None


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(grad_y, x, weight, y, argmax, has_bias, conv, pool, mask):
    g = grad_y * (y > 0)
    n, c, h, w, oh, ow, kh, kw, sh, sw, ph, pw = geometry = _geometry(conv_output_shape(x, weight, conv), pool)
    a = argmax.long()
    rows = (torch.arange(oh, device=x.device) * sh - ph)[:, None] + torch.div(a, kw, rounding_mode="floor")
    cols = (torch.arange(ow, device=x.device) * sw - pw) + a % kw
    dz = torch.zeros((n, c, h * w), dtype=g.dtype, device=g.device)
    dz.scatter_add_(2, (rows * w + cols).reshape(n, c, -1), g.reshape(n, c, -1))
    db = g.sum((0, 2, 3)) if has_bias and mask[2] else None
    return (*_conv_grads(dz.view(n, c, h, w), x, weight, *conv, mask), db)


# ---------------------------------------------------------------------------------------------------- cpu (C++)
_channels_last = channel_ops.is_channels_last


def _in_layout_of(x: torch.Tensor, y: torch.Tensor, argmax: Optional[torch.Tensor]) -> tuple:
    """(y, argmax) computed channels-last, returned in x's layout (argmax None: none kept)."""
    if _channels_last(x):
        return y, argmax
    return as_layout(y, False), None if argmax is None else as_layout(argmax, False)


# oneDNN's convolutions and our pool epilogue are both fastest channels-last (AlexNet conv1, B16: the eager NCHW
# chain 34 ms, channels-last 20 ms): the cpu backend computes in channels-last whatever the input's layout and
# returns y in the input's layout.
CL = torch.channels_last


@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=channel_ops.LOW, available=_ext.cpu_unavailable)
def cpu_forward(x, weight, bias, conv, pool, keep_argmax=True):
    # 16-bit: the convolution adds the bias before its rounding (_eager.bias_in_gemm); max commutes with it
    conv_bias, bias = (bias, None) if _eager.bias_in_gemm(x, bias) else (None, bias)
    z = as_layout(F.conv2d(as_layout(x, True), weight, conv_bias, *conv), True)
    geometry = _geometry(z.shape, pool)
    shape = (geometry[0], geometry[1], geometry[4], geometry[5])
    y = torch.empty(shape, dtype=z.dtype, memory_format=CL)
    # without argmax (inference) the epilogue keeps no offsets: AlexNet conv1+pool B16 epilogue 1.40 → 0.78 ms
    argmax = torch.empty(shape, dtype=torch.uint8, memory_format=CL) if keep_argmax else None
    b = None if bias is None else bias.float().contiguous()
    _ext.cpu.maxpool_bias_relu_forward(z.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
                                       0 if argmax is None else argmax.data_ptr(), geometry, _ext.DTYPE_CODE[z.dtype])
    return _in_layout_of(x, y, argmax)


def pool_args(kernel_size, stride, padding) -> tuple[list[int], list[int], list[int]]:
    """(kernel, stride, padding) as pairs, stride None meaning the kernel size (torch's rule); ValueError for what
    the kernels cannot pool (windows over 256 elements, padding over half the window)."""
    kernel = _pair(kernel_size)
    pstride = kernel if stride is None else _pair(stride)
    ppad = _pair(padding)
    if any(k < 1 for k in kernel) or any(s < 1 for s in pstride) or kernel[0] * kernel[1] > 256:
        raise ValueError(f"pool_kernel_size must be positive with at most 256 elements and pool_stride positive, "
                         f"got {tuple(kernel)} and {tuple(pstride)}")
    if any(p < 0 or 2 * p > k for p, k in zip(ppad, kernel)):
        raise ValueError(f"pool_padding should be at most half of pool_kernel_size, got {tuple(ppad)} for "
                         f"{tuple(kernel)}")
    return kernel, pstride, ppad


def fusable_pool(pool) -> bool:
    """Whether an nn.MaxPool2d can be this op's pool: dilation 1, no returned indices (dlcore.nn.Conv2dReLUMaxPool2d, the
    folded ResNet stem, dlcore.patch and fuse_for_inference ask)."""
    return isinstance(pool, torch.nn.MaxPool2d) and pool.dilation in (1, (1, 1)) and not pool.return_indices


def cpu_maxpool_inference(z: torch.Tensor, pool: torch.nn.MaxPool2d) -> Optional[torch.Tensor]:
    """relu(maxpool(z)) for a non-negative channels-last CPU tensor z (after a conv + ReLU), no argmax kept: the
    pool of the folded ResNet stem in inference (the C++ epilogue without its offsets: 8×64×112×112, 3×3/2 →
    see blocks.FoldedConv2d). None when it does not apply (then the caller pools with torch)."""
    if (_ext.cpu is None or z.dtype not in channel_ops.LOW or not z.is_contiguous(memory_format=CL) or z.requires_grad
            or not fusable_pool(pool)):
        return None
    try:
        k, st, pad = pool_args(pool.kernel_size, pool.stride, pool.padding)
    except ValueError:
        return None  # torch's pool gives its own result or error
    geometry = _geometry(z.shape, (*k, *st, *pad, bool(pool.ceil_mode)))
    y = torch.empty((geometry[0], geometry[1], geometry[4], geometry[5]), dtype=z.dtype, memory_format=CL)
    _ext.cpu.maxpool_bias_relu_forward(z.data_ptr(), 0, y.data_ptr(), 0, geometry, _ext.DTYPE_CODE[z.dtype])
    return y


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=channel_ops.LOW, available=_ext.cpu_unavailable)
def cpu_backward(grad_y, x, weight, y, argmax, has_bias, conv, pool, mask):
    geometry = _geometry(conv_output_shape(x, weight, conv), pool)
    grad_y, y, argmax = (as_layout(t, True) for t in (grad_y, y, argmax))
    dz = torch.empty(geometry[:4], dtype=y.dtype, memory_format=CL)
    db = torch.empty(geometry[1], dtype=torch.float32) if has_bias and mask[2] else None
    _ext.cpu.maxpool_bias_relu_backward(grad_y.data_ptr(), y.data_ptr(), argmax.data_ptr(), dz.data_ptr(),
                                        0 if db is None else db.data_ptr(), geometry, _ext.DTYPE_CODE[y.dtype])
    dx, dw = cpu_conv_grads(dz, as_layout(x, True), weight, *conv, mask)
    if dx is not None and not _channels_last(x):
        dx = as_layout(dx, False)
    return dx, dw, None if db is None else db.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------- triton
def fused_problem(x, weight, conv, pool, keep_argmax: bool = True):
    """What the fused implicit-GEMM forwards (triton v2, cuda) take: x in its own layout (channels_last or NCHW),
    the weight as B[k = (r, s, ci), co] = [KH, KW, Cin, Cout], the outputs y and argmax in x's layout (argmax None
    when not keep_argmax: the kernels then write no offsets), and the 31
    sizes, strides and geometry numbers, in the order both kernels read them:
    M, Cin, Cout, H, W, ZH, ZW, OH, OW, x strides (n, c, h, w), y strides (n, c, h, w),
    SH, SW, PH, PW, DH, DW, KH, KW, PSH, PSW, PPH, PPW, PKH, PKW."""
    (sh, sw), (ph, pw), (dh, dw), _ = conv
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    _, _, zh, zw, oh, ow, *_ = _geometry(conv_output_shape(x, weight, conv), pool)
    layout = CL if _channels_last(x) else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    y = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=layout)
    arg = torch.empty_like(y, dtype=torch.uint8) if keep_argmax else None
    wt = weight.to(x.dtype).permute(2, 3, 1, 0).contiguous()
    pkh, pkw, psh, psw, pph, ppw, _ = pool
    dims = [n * oh * ow, cin, cout, h, w, zh, zw, oh, ow, *x.stride(), *y.stride(), sh, sw, ph, pw, dh, dw, kh, kw,
            psh, psw, pph, ppw, pkh, pkw]
    return x, wt, y, arg, dims


@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=channel_ops.LOW,
                    available=_ext.triton_unavailable("conv_pool"))
def triton_forward(x, weight, bias, conv, pool, keep_argmax=True):
    from dlcore.kernels import conv_pool as kernels

    b = None if bias is None else bias.float().contiguous()
    if conv[3] == 1:  # v2: the implicit-GEMM convolution with the epilogue fused, in x's layout
        x, wt, y, arg, dims = fused_problem(x, weight, conv, pool, keep_argmax)
        kernels.fused_forward(x, wt, b, y, arg, dims)
        return y, arg
    conv_bias, b = (bias, None) if _eager.bias_in_gemm(x, bias) else (None, b)
    z = as_layout(F.conv2d(as_layout(x, True), weight, conv_bias, *conv), True)
    y, argmax = kernels.forward(z, b, _geometry(z.shape, pool), keep_argmax)
    return _in_layout_of(x, y, argmax)


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=channel_ops.LOW,
                    available=_ext.triton_unavailable("conv_pool"))
def triton_backward(grad_y, x, weight, y, argmax, has_bias, conv, pool, mask):
    from dlcore.kernels import conv_pool as kernels

    geometry = _geometry(conv_output_shape(x, weight, conv), pool)
    grad_y, y, argmax = (as_layout(t, True) for t in (grad_y, y, argmax))
    dz, db = kernels.backward(grad_y, y, argmax, geometry, has_bias and mask[2])
    dx, dw = _conv_grads(dz, as_layout(x, True), weight, *conv, mask)
    if dx is not None and not _channels_last(x):
        dx = as_layout(dx, False)
    return dx, dw, None if db is None else db.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------- cuda (C++)


@_dispatch.register(FORWARD, "cuda", devices=("cuda",), dtypes=channel_ops.LOW, available=_ext.cuda_unavailable)
def cuda_forward(x, weight, bias, conv, pool, keep_argmax=True):
    if conv[3] != 1:
        return reference_forward(x, weight, bias, conv, pool, keep_argmax)
    x, wt, y, arg, dims = fused_problem(x, weight, conv, pool, keep_argmax)
    b = None if bias is None else bias.float().contiguous()
    with torch.cuda.device(x.device):
        _ext.cuda.conv_pool_forward(x.data_ptr(), wt.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(),
                                    0 if arg is None else arg.data_ptr(), dims, _ext.DTYPE_CODE[x.dtype],
                                    _ext.cuda_stream(x.device))
    return y, arg


_dispatch.register(BACKWARD, "cuda", devices=("cuda",), dtypes=channel_ops.LOW,
                   available=_ext.cuda_unavailable)(reference_backward)


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dlcore::conv2d_relu_maxpool2d", mutates_args=())
def conv2d_relu_maxpool2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                             pool_kernel: Sequence[int], pool_stride: Sequence[int], pool_padding: Sequence[int],
                             ceil_mode: bool, keep_argmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    conv = (list(stride), list(padding), list(dilation), groups)
    pool = (*pool_kernel, *pool_stride, *pool_padding, ceil_mode)
    # keep_argmax False: a backend may skip the argmax (returning any placeholder); the op returns an empty one
    y, argmax = _dispatch.select(FORWARD, x.device, x.dtype)[1](x, weight, bias, conv, pool, keep_argmax)
    return y, argmax if keep_argmax else _no_argmax(x)


@conv2d_relu_maxpool2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride, pool_padding, ceil_mode,
      keep_argmax):
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    y = F.max_pool2d(z, pool_kernel, pool_stride, pool_padding, 1, ceil_mode)
    return y, torch.empty_like(y, dtype=torch.uint8) if keep_argmax else _no_argmax(x)


@torch.library.custom_op("dlcore::conv2d_relu_maxpool2d_backward", mutates_args=())
def conv2d_relu_maxpool2d_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                                      argmax: torch.Tensor, has_bias: bool, stride: Sequence[int],
                                      padding: Sequence[int], dilation: Sequence[int], groups: int,
                                      pool_kernel: Sequence[int], pool_stride: Sequence[int],
                                      pool_padding: Sequence[int], ceil_mode: bool,
                                      mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    conv = (list(stride), list(padding), list(dilation), groups)
    pool = (*pool_kernel, *pool_stride, *pool_padding, ceil_mode)
    dx, dw, db = _dispatch.select(BACKWARD, x.device, x.dtype)[1](grad_y, x, weight, y, argmax, has_bias, conv, pool,
                                                                  list(mask))
    empty = x.new_empty(0)
    return (empty if dx is None else dx), (empty if dw is None else dw), (empty if db is None else db)


@conv2d_relu_maxpool2d_backward_op.register_fake
def _(grad_y, x, weight, y, argmax, has_bias, stride, padding, dilation, groups, pool_kernel, pool_stride,
      pool_padding, ceil_mode, mask):
    return (torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(weight) if mask[1] else
            weight.new_empty(0), weight.new_empty(weight.shape[0]) if has_bias and mask[2] else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, *conf = inputs
    y, argmax = output
    ctx.save_for_backward(x, weight, y, argmax, bias)
    ctx.conf = (bias is not None, *[list(c) if isinstance(c, (list, tuple)) else c for c in conf[:-1]])
    ctx.mark_non_differentiable(argmax)


def _differentiable_backward(grad_y, x, weight, bias, stride, padding, dilation, groups, pool_kernel, pool_stride,
                             pool_padding, ceil_mode):
    """(dx, dw, db) from plain torch ops under autograd, for a backward with create_graph=True (a gradient penalty
    on an AlexNet-style critic, double backprop): autograd of the reference chain conv → max-pool → ReLU against
    dy. torch's pool picks each window's maximum again; in 16-bit, where two elements round equal, it may pick
    another than the kernel did (same value, the gradient routed to the other position)."""
    conv = (stride, padding, dilation, groups)
    pool = (*pool_kernel, *pool_stride, *pool_padding, ceil_mode)
    return _eager.differentiable_grads(lambda x, w, b: reference_forward(x, w, b, conv, pool, keep_argmax=False)[0],
                                       (x, weight, bias), grad_y)


def _backward(ctx, grad_y, _grad_argmax):
    x, weight, y, argmax, bias = ctx.saved_tensors
    if _eager.torch_ops_backward(grad_y):  # create_graph=True: gradients that autograd can differentiate again
        return (*_differentiable_backward(grad_y, x, weight, bias, *ctx.conf[1:]),) + (None,) * 9
    if argmax.numel() != y.numel():
        raise RuntimeError("conv2d_relu_maxpool2d: the forward kept no pool argmax (it ran without a gradient "
                           "wanted); backward needs a forward with keep_argmax=True")
    has_bias = ctx.conf[0]
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    dx, dw, db = _conv2d_relu_maxpool2d_backward(grad_y, x, weight, y, argmax, *ctx.conf, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None) + (None,) * 9


_conv2d_relu_maxpool2d = _eager.eager_autograd(conv2d_relu_maxpool2d_op, _setup_context, _backward)
_conv2d_relu_maxpool2d_backward = _eager.direct(conv2d_relu_maxpool2d_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def conv2d_relu_maxpool2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                          padding=0, dilation=1, groups: int = 1, pool_kernel_size=3, pool_stride=None,
                          pool_padding=0, ceil_mode: bool = False) -> torch.Tensor:
    """F.max_pool2d(F.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups)), pool_kernel_size,
    pool_stride, pool_padding, ceil_mode=ceil_mode) as one op. pool_stride None means the kernel size (torch's
    rule). x: [N, C_in, H, W] or [C_in, H, W] (NCHW or channels_last; the output keeps the layout), floating point
    (the CPU twin runs fp32/bf16/fp16, other dtypes and CUDA tensors the reference). Under autocast the floating
    arguments run in autocast's dtype, as F.conv2d's do (the result too)."""
    x, weight, bias = _eager.autocast_inputs(x, weight, bias)
    check_conv_args(x, weight, bias, {}, padding)
    if x.dim() == 3:
        return conv2d_relu_maxpool2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                                     pool_kernel_size, pool_stride, pool_padding, ceil_mode).squeeze(0)
    check_groups(x, weight, groups)
    x, padding = string_padding(x, weight, padding, stride, dilation)
    conv = conv_pairs(stride, padding, dilation, groups)
    kernel, pstride, ppad = pool_args(pool_kernel_size, pool_stride, pool_padding)
    z_hw = checked_output_shape(x, weight, conv)[2:]
    out = [pool_output_size(z_hw[i], kernel[i], pstride[i], ppad[i], ceil_mode) for i in range(2)]
    if any(o <= 0 for o in out):
        raise ValueError(f"pool window {tuple(kernel)} is larger than the padded convolution output {tuple(z_hw)}")
    if x.numel() == 0:  # an empty batch (or no input channels): torch's own (empty or zero) result
        return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, *conv)), kernel, pstride, ppad, ceil_mode=ceil_mode)
    # the pool's argmax only when a backward can follow (and always under tracing and transforms, where
    # requires_grad may not tell)
    keep_argmax = (torch.is_grad_enabled() and _eager.wants_grad((x, weight, bias))
                   or not _eager.plain_eager((x, weight, bias)))
    y, _ = _conv2d_relu_maxpool2d(x, weight, bias, *conv, kernel, pstride, ppad, bool(ceil_mode), keep_argmax)
    return y


