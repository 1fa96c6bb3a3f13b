"""conv2d_relu: y = relu(conv2d(x, w) + b + residual), forward and backward (the first half of issue 3's fused op,
and issue 6's residual-block epilogue: with batch norm folded into w and b, a ResNet BasicBlock is two of these).
The maxpool version is dlcore/ops/conv_pool.py.

Backends (each: torch's convolution — oneDNN on the CPU, cuDNN on a GPU — without its bias, then the epilogue;
except that triton and cuda without a residual and with groups = 1 run conv_pool's fused implicit-GEMM forward with
a 1×1 pool: the convolution and its epilogue in one kernel)
  reference  F.relu(F.conv2d(x, w, b, ...) + residual); backward by the same formulas in plain PyTorch. Every dtype.
  cpu        epilogue = dlcore/ops/batch_norm.py's channel_affine_act (csrc/cpu/batch_norm.cpp): bias, residual and
             ReLU in place, one pass; backward: one pass for dz = dy·[y > 0] and db = Σ dz
             (channel_act_backward_reduce),
             then torch's convolution_backward for dx and dw. fp32/bf16/fp16, NCHW and channels_last.
  triton     the same two channel kernels from kernels/batch_norm.py (the interpreter on CPU tensors).
  cuda       the same two from csrc/cuda/batch_norm.cu (compiled for sm_90, not yet run on a GPU).
Backward needs only the output y (y > 0 ⇔ z + b + r > 0), never the pre-activation; the residual's gradient is dz.

Autograd: one custom op `dlcore::conv2d_relu` (+ fake) with a registered backward that is itself the custom op
`dlcore::conv2d_relu_backward` (+ fake), so torch.compile(fullgraph=True) sees single nodes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dlcore import _checks, _dispatch, _eager
from dlcore.ops import batch_norm as channel_ops

FORWARD, BACKWARD = "conv2d_relu", "conv2d_relu_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton", "cuda"))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
RELU = channel_ops.ACTIVATIONS["relu"]


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def conv_output_shape(x, weight, conv) -> tuple:
    """[N, C_out, H', W'] of conv2d(x, weight) with conv = (stride, padding, dilation, groups) as pairs."""
    stride, padding, dilation, _ = conv
    return (x.shape[0], weight.shape[0],
            *[(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
              for i in range(2)])


def checked_output_shape(x, weight, conv) -> tuple:
    """conv_output_shape, or ValueError when the dilated kernel is larger than the padded input (an empty output;
    torch raises a RuntimeError for it too, which a backend that does not call torch's convolution would miss)."""
    shape = conv_output_shape(x, weight, conv)
    if any(s <= 0 for s in shape[2:]):
        raise ValueError(f"the convolution's output would be empty ({tuple(shape[2:])}): input {tuple(x.shape)} "
                         f"with padding {conv[1]} is smaller than weight {tuple(weight.shape)} at dilation {conv[2]}")
    return shape


def check_conv_args(x, weight, bias, extra: dict, padding) -> None:
    """The checks every fused conv op makes of its convolution's arguments (x may be 3-D: the caller unsqueezes);
    `extra`: other tensors that must match x's device and dtype ({name: tensor or None})."""
    if not (type(x) in _PLAIN and type(weight) in _PLAIN and x.dtype is weight.dtype and x.is_floating_point()
            and x.device == weight.device):  # the common case costs one line (~1 µs less per call at batch 1)
        _checks.tensor("input", x)
        _checks.tensor("weight", weight, like=x)
    for name, t in (("bias", bias), *extra.items()):
        if t is not None:
            _checks.tensor(name, t, like=x)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in/groups, kH, kW], got shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        _checks.shape("bias", bias, (weight.shape[0],))
    if x.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D or 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same', 'valid' or integers, got {padding!r}")


def string_padding(x: torch.Tensor, weight: torch.Tensor, padding, stride, dilation) -> tuple:
    """(x, padding) with torch's string paddings made integers: 'valid' is 0; 'same' (stride 1 only, as in torch)
    pads dilation·(kernel − 1) in all, half on each side and the odd one on the bottom/right — that one by padding x
    itself, as torch's convolution does. Integer paddings pass through."""
    if not isinstance(padding, str):
        return x, padding
    if padding == "valid":
        return x, 0
    if any(s != 1 for s in _pair(stride)):
        raise ValueError("padding='same' is not supported for strided convolutions (as in torch)")
    total = [d * (k - 1) for d, k in zip(_pair(dilation), weight.shape[2:])]
    extra = [t - 2 * (t // 2) for t in total]  # (H, W)
    if any(extra):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return x, tuple(t // 2 for t in total)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_CONV_PAIRS: dict = {}  # (stride, padding, dilation, groups) as given (ints or tuples: hashable) -> conv_pairs'


def conv_pairs(stride, padding, dilation, groups) -> tuple:
    """(stride, padding, dilation, groups) with the first three as pairs; ValueError naming the argument for a
    stride or dilation below 1 or a negative padding (torch raises a RuntimeError without the name). Results for
    hashable arguments (modules store tuples) are kept: the conversion cost ~1.5 µs a call at batch 1."""
    key = (stride, padding, dilation, groups)
    try:
        return _CONV_PAIRS[key]
    except (KeyError, TypeError):  # not seen yet, or lists (unhashable)
        pass
    conv = (tuple(_pair(stride)), tuple(_pair(padding)), tuple(_pair(dilation)), int(groups))
    for name, pair, least in (("stride", conv[0], 1), ("padding", conv[1], 0), ("dilation", conv[2], 1)):
        if any(v < least for v in pair):
            raise ValueError(f"{name} must be at least {least}, got {tuple(pair)}")
    try:
        if len(_CONV_PAIRS) < 4096:
            _CONV_PAIRS[key] = conv
    except TypeError:
        pass
    return conv


def check_groups(x, weight, groups: int) -> None:
    if groups < 1 or x.shape[1] % groups or weight.shape[0] % groups or x.shape[1] // groups != weight.shape[1]:
        raise ValueError(f"groups={groups} does not fit input channels {x.shape[1]}, weight {tuple(weight.shape)}")


# ---------------------------------------------------------------------------------------------------- reference
@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(x, weight, bias, residual, stride, padding, dilation, groups):
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return F.relu(z if residual is None else z + residual)


def _conv_grads(dz, x, weight, stride, padding, dilation, groups, mask):
    """(dx, dw) of the bias-free convolution, given dz = ∂L/∂(conv output): torch's convolution_backward."""
    if not (mask[0] or mask[1]):
        return None, None
    dx, dw, _ = torch.ops.aten.convolution_backward(dz, x, weight, None, stride, padding, dilation, False, [0, 0],
                                                    groups, [mask[0], mask[1], False])
    return dx, dw


FEW_CHANNELS = 4  # input channels up to which the CPU backward takes dx from csrc/cpu/conv_input_grad.cpp


def cpu_conv_grads(dz, x, weight, stride, padding, dilation, groups, mask):
    """_conv_grads for the CPU backends: dx of an fp32 convolution with few input channels (an image or a frame
    stack: C_in ≤ 4, KW·C_in ≤ 64, no groups or dilation) from csrc/cpu/conv_input_grad.cpp, since oneDNN's
    backward-data runs those shapes 3–17× under the FLOP rate (AlexNet conv1 dx: 56.7 → 17.8 ms, DQN conv1:
    2.77 → 0.95 ms on the AMD VM); dw (and every other shape) from torch."""
    c_in, kw = weight.shape[1], weight.shape[3]
    if not (mask[0] and x.dtype == weight.dtype == dz.dtype == torch.float32 and groups == 1
            and tuple(dilation) == (1, 1) and c_in <= FEW_CHANNELS and kw * c_in <= 64):
        return _conv_grads(dz, x, weight, stride, padding, dilation, groups, mask)
    from dlcore import _ext

    n, _, h, w = x.shape
    dzc = channel_ops.as_layout(dz, True)
    wc = weight.contiguous()  # held in a name: `weight.contiguous().data_ptr()` freed a copy before the call read it
    dx = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last)
    _ext.cpu.conv2d_input_grad(dzc.data_ptr(), wc.data_ptr(), dx.data_ptr(), n, c_in, h, w,
                               weight.shape[0], weight.shape[2], kw, dz.shape[2], dz.shape[3], stride[0], stride[1],
                               padding[0], padding[1])
    if not x.is_contiguous(memory_format=torch.channels_last):
        dx = channel_ops.as_layout(dx, False)  # x's layout, as torch's backward gives it
    return dx, _conv_grads(dz, x, weight, stride, padding, dilation, groups, (False, mask[1]))[1]


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask):
    dz = grad_y * (y > 0)  # ReLU'(z + b + r) read from the output
    db = dz.sum((0, 2, 3)) if has_bias and mask[2] else None
    return (*_conv_grads(dz, x, weight, stride, padding, dilation, groups, mask), db, dz)


# ------------------------------------------------------------------------------------- cpu / triton (epilogue)
def _epilogue_backends(backend: str, dtypes):
    """Register `backend` for both ops: torch's convolution, then that backend's channel kernels; on triton and
    cuda without a residual, the fused implicit-GEMM forward of dlcore/ops/conv_pool.py instead."""
    affine = _dispatch.get_op(channel_ops.AFFINE).impls[backend]
    reduce = _dispatch.get_op(channel_ops.REDUCE).impls[backend]
    devices = tuple(affine.devices)

    @_dispatch.register(FORWARD, backend, devices=devices, dtypes=dtypes, available=affine.available)
    def forward(x, weight, bias, residual, stride, padding, dilation, groups):
        if backend in ("triton", "cuda") and residual is None and groups == 1:
            # the implicit-GEMM convolution with its epilogue fused (conv2d_relu_maxpool2d's, with a 1×1 pool)
            from dlcore.ops import conv_pool

            launch = _dispatch.get_op(conv_pool.FORWARD).impls[backend].fn
            return launch(x, weight, bias, (stride, padding, dilation, groups), conv_pool.NO_POOL, False)[0]
        if _eager.bias_in_gemm(x, bias):  # 16-bit: the convolution adds the bias before its rounding
            bias, y = None, F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        else:
            y = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        y = channel_ops.dense_like(y)
        r = None if residual is None else channel_ops.dense_like(residual, y)
        shift = None if bias is None else _checks.dense_vector(bias, torch.float32)
        return affine.fn(y, r, None, shift, y, channel_ops.channel_dims(y), RELU, 0.0)

    @_dispatch.register(BACKWARD, backend, devices=devices, dtypes=dtypes, available=reduce.available)
    def backward(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask):
        y = channel_ops.dense_like(y)
        dz = torch.empty_like(y)
        db, _ = reduce.fn(channel_ops.dense_like(grad_y, y), y, None, None, dz, channel_ops.channel_dims(y), RELU,
                          0.0)
        db = db.to(weight.dtype) if has_bias and mask[2] else None
        grads = cpu_conv_grads if backend == "cpu" else _conv_grads
        return (*grads(dz, x, weight, stride, padding, dilation, groups, mask), db, dz)


for _backend in ("cpu", "triton", "cuda"):
    _epilogue_backends(_backend, channel_ops.LOW)


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dlcore::conv2d_relu", mutates_args=())
def conv2d_relu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int) -> torch.Tensor:
    _, launch = _dispatch.select(FORWARD, x.device, x.dtype)
    return launch(x, weight, bias, residual, list(stride), list(padding), list(dilation), groups)


@conv2d_relu_op.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # meta tensors: shapes only


@torch.library.custom_op("dlcore::conv2d_relu_backward", mutates_args=())
def conv2d_relu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor,
                            has_bias: bool, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                            groups: int, mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """(dx, dw, db, dz): dz = ∂L/∂(conv output + bias + residual), the residual's gradient."""
    _, launch = _dispatch.select(BACKWARD, x.device, x.dtype)
    dx, dw, db, dz = launch(grad_y, x, weight, y, has_bias, list(stride), list(padding), list(dilation), groups,
                            list(mask))
    # custom ops return tensors, never None: empty placeholders for the gradients not asked for
    empty = x.new_empty(0)
    return (empty if dx is None else dx), (empty if dw is None else dw), (empty if db is None else db), dz


@conv2d_relu_backward_op.register_fake
def _(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups, mask):
    return (torch.empty_like(x) if mask[0] else x.new_empty(0), torch.empty_like(weight) if mask[1] else
            weight.new_empty(0), weight.new_empty(weight.shape[0]) if has_bias and mask[2] else weight.new_empty(0),
            torch.empty_like(y))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conf = (bias is not None, list(stride), list(padding), list(dilation), groups)


def _differentiable_backward(grad_y, x, weight, y, stride, padding, dilation, groups, mask):
    """(dx, dw, db, dz) from plain torch ops under autograd, for a backward with create_graph=True (a gradient
    penalty, double backprop): dz = relu'(z)·dy, the gate read from y's sign (piecewise constant), then (dx, dw) =
    autograd of conv2d(x, w) against dz, db = Σ dz over all but the channel dim."""
    dz = torch.where(y.detach() > 0, grad_y, torch.zeros_like(grad_y))
    dx, dw = _eager.differentiable_grads(lambda x, w: F.conv2d(x, w, None, stride, padding, dilation, groups),
                                         (x, weight), dz, needed=mask[:2])
    return dx, dw, dz.sum((0, 2, 3)) if mask[2] else None, dz


def _backward(ctx, grad_y):
    x, weight, y = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups = ctx.conf
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
    if _eager.torch_ops_backward(grad_y):  # create_graph=True: gradients that autograd can differentiate again
        dx, dw, db, dz = _differentiable_backward(grad_y, x, weight, y, stride, padding, dilation, groups, mask)
    else:
        dx, dw, db, dz = _conv2d_relu_backward(grad_y, x, weight, y, has_bias, stride, padding, dilation, groups,
                                               mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
            dz if ctx.needs_input_grad[3] else None, None, None, None, None)


_conv2d_relu = _eager.eager_autograd(conv2d_relu_op, _setup_context, _backward)
_conv2d_relu_backward = _eager.direct(conv2d_relu_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def conv2d_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                dilation=1, groups: int = 1, *, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual), as torch.nn.functional.conv2d
    followed by an add and relu. x: [N, C_in, H, W] or [C_in, H, W] (NCHW or channels_last), weight:
    [C_out, C_in/groups, kH, kW], bias: [C_out] or None, residual: None or the output's shape; floating dtypes
    (the CPU twin runs fp32/bf16/fp16, float64 the reference). Under autocast the floating arguments run in
    autocast's dtype, as F.conv2d's do (the result too)."""
    x, weight, bias, residual = _eager.autocast_inputs(x, weight, bias, residual)
    check_conv_args(x, weight, bias, {"residual": residual}, padding)
    if x.dim() == 3:
        r = None if residual is None else residual.unsqueeze(0)
        return conv2d_relu(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, residual=r).squeeze(0)
    check_groups(x, weight, groups)
    x, padding = string_padding(x, weight, padding, stride, dilation)
    conv = conv_pairs(stride, padding, dilation, groups)
    out_shape = checked_output_shape(x, weight, conv)
    if residual is not None:
        _checks.shape("residual", residual, out_shape)
    return _conv2d_relu(x, weight, bias, residual, *conv)
