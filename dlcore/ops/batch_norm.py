"""Fused batch norm + residual add + activation, forward and backward (issue 6):

    y = act(γ·(x − μ)·ρ + β + r),   ρ = 1/√(σ² + ε),   act ∈ {identity, ReLU, LeakyReLU(slope ≥ 0)}

A ResNet block ends in BN → add → ReLU and DCGAN's layers in BN → (Leaky)ReLU: torch runs each as its own pass
over the activation (and saves its own input for backward). Here the batch statistics take one pass over x and
normalise + affine + residual + activation one more; backward takes two passes (per-channel sums, then dx), reads
the saved output y for act' (y > 0 ⇔ z > 0), and saves only x and y.

The four channel-wise kernels behind it (each a dispatch op with reference / cpu / triton backends; tensors
viewed as [outer, C, inner] — NCHW (N, C, H·W), channels_last and [N, C] (N·H·W, C, 1)):
  batch_norm_stats(x, dims) -> (μ, σ² biased)                         one pass; Welford/Chan merges of tiles
  channel_affine_act(x, r, scale, shift, out, dims, act, slope)       out = act(scale·x + shift + r)
  channel_act_backward_reduce(dy, y, x, μ, dz, dims, act, slope)      (S1 = Σ dz, S2 = Σ dz·(x − μ)), dz = act'·dy
  channel_act_backward_apply(dy, y, x, a, b, k, dx, dims, act, slope) dx = a·dz + b·x + k
with the per-channel coefficients folded in PyTorch on [C] vectors (M = N·H·W values per channel):
  forward  scale = γρ, shift = β − μγρ
  backward dβ = S1, dγ = ρ·S2;  training: a = γρ, b = −γρ³·S2/M, k = −γρ·S1/M − b·μ   (the gradient through μ
           and σ²: dx = γρ/M·(M·dz − S1 − x̂·Σ dz·x̂));  eval: a = γρ, b = k = 0.  The residual's gradient is dz.
The conv epilogue of dlcore/ops/conv_relu.py (bias + residual + ReLU) is channel_affine_act with no scale.

Running statistics are updated as torch does: momentum (None: cumulative average over num_batches_tracked),
unbiased variance σ²·M/(M − 1).

Backends: reference (plain PyTorch, float64 too), cpu (csrc/cpu/batch_norm.cpp, fp32/bf16/fp16 storage),
triton (kernels/batch_norm.py), cuda (csrc/cuda/batch_norm.cu; compiled for sm_90 here, never run on a GPU yet —
so the GPU default stays triton, whose kernels are checked through the interpreter, until a GPU run measures both).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from dlcore import _checks, _dispatch, _eager, _ext

STATS, AFFINE, REDUCE, APPLY = ("batch_norm_stats", "channel_affine_act", "channel_act_backward_reduce",
                                "channel_act_backward_apply")
for _name in (STATS, AFFINE, REDUCE, APPLY):
    _dispatch.define_op(_name, gpu_order=("triton", "cuda"))  # unmeasured: see the module docstring
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2}


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_dims(t: torch.Tensor) -> tuple[int, int, int]:
    """(outer, C, inner) of a tensor [N, C, *] dense in its own layout (see dense_like)."""
    n, c = t.shape[0], t.shape[1]
    inner = math.prod(t.shape[2:])  # (from the shape: indexing t[0, 0] cost ~7 µs a call)
    if t.dim() > 2 and inner > 1 and c > 1 and not t.is_contiguous():  # channels_last(_3d): channels innermost
        return n * inner, c, 1
    return n, c, inner


def is_channels_last(t: torch.Tensor) -> bool:
    """t's strides are channels-last-like (channels_last_3d for 5-D), as torch's Tensor.suggest_memory_format
    decides the layout of a convolution's or batch norm's result: a dense or sliced channels-last tensor, not a
    transposed view whose channel stride happens to be 1, nor an ambiguous one (C = 1 or 1×1) made contiguous."""
    if t.dim() not in (4, 5) or _eager.in_transform():  # (taken as NCHW there: vmap cannot answer the query)
        return False
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    dense, dense_cl = t.is_contiguous(), t.is_contiguous(memory_format=fmt)
    if dense != dense_cl or _suggest_memory_format is None:  # (the common cases, without the Python mirror)
        return dense_cl and not dense and t.shape[1] > 1
    return _suggest_memory_format(t) is not torch.contiguous_format  # ambiguous (C = 1, 1×1) or not dense


try:  # the Python mirror of eager's Tensor.suggest_memory_format (private; absent from older torch)
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # pragma: no cover
    _suggest_memory_format = None


def dense_like(t: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t dense in `like`'s layout (channels_last kept as is, anything else made contiguous)."""
    return as_layout(t, is_channels_last(t if like is None else like))


_WORD_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8, torch.int16,
                torch.int32, torch.int64, torch.bool}


def as_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t.contiguous(memory_format=channels_last (channels_last_3d for 5-D) if channels_last else contiguous_format).
    A 4-D CPU tensor dense in the other layout is moved by csrc/cpu/layout.cpp's batched transpose: torch copies
    it element by element through its strided iterator (AMD VM, allocation included: AlexNet conv5's input
    [16, 256, 13, 13] fp32 to channels_last 0.43 → 0.16 ms, [16, 3, 224, 224] 0.88 → 0.48 ms, bf16
    [16, 64, 55, 55] 2.23 → 1.02 ms; uint8 on par)."""
    if _eager.in_transform():  # layouts are the kernels' concern; under vmap torch cannot convert them
        return t
    fmt = torch.contiguous_format if not channels_last else torch.channels_last_3d if t.dim() == 5 \
        else torch.channels_last
    if t.is_contiguous(memory_format=fmt):
        return t
    if (t.dim() == 4 and t.device.type == "cpu" and t.dtype in _WORD_DTYPES and _ext.cpu is not None
            and not (t.requires_grad and torch.is_grad_enabled())  # the copy would not be recorded
            and t.is_contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last)):
        n, c, h, w = t.shape
        out = torch.empty(t.shape, dtype=t.dtype, memory_format=fmt)
        rows, cols = (c, h * w) if channels_last else (h * w, c)  # [N, rows, cols] → [N, cols, rows]
        _ext.cpu.batched_transpose(t.data_ptr(), out.data_ptr(), n, rows, cols, t.element_size())
        return out
    return t.contiguous(memory_format=fmt)


def _view3(t: torch.Tensor, dims) -> torch.Tensor:
    """The [outer, C, inner] view of a dense tensor's memory (for the reference backend)."""
    outer, c, inner = dims
    if inner == 1 and t.dim() > 2:  # channels last: memory is [N, *spatial, C]
        return t.movedim(1, -1).reshape(outer, c, 1)
    return t.reshape(outer, c, inner)


def _activate(z: torch.Tensor, activation: int, slope: float) -> torch.Tensor:
    return z.relu() if activation == 1 else F.leaky_relu(z, slope) if activation == 2 else z


def _activation_grad(dy: torch.Tensor, y: Optional[torch.Tensor], activation: int, slope: float) -> torch.Tensor:
    if activation == 0:
        return dy
    return torch.where(y > 0, dy, dy * slope if activation == 2 else torch.zeros_like(dy))


def _addr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------------- reference
@_dispatch.register(STATS, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_stats(x, dims):
    v = _view3(x, dims).to(stats_dtype(x.dtype))
    return v.mean((0, 2)), v.var((0, 2), unbiased=False)


@_dispatch.register(AFFINE, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_affine_act(x, residual, scale, shift, out, dims, activation, slope):
    z = _view3(x, dims).to(stats_dtype(x.dtype))
    if scale is not None:
        z = z * scale[:, None]
    if shift is not None:
        z = z + shift[:, None]
    if residual is not None:
        z = z + _view3(residual, dims)
    _view3(out, dims).copy_(_activate(z, activation, slope))
    return out


@_dispatch.register(REDUCE, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward_reduce(dy, y, x, mean, dz, dims, activation, slope):
    sd = stats_dtype(dy.dtype)
    g = _activation_grad(_view3(dy, dims).to(sd), None if y is None else _view3(y, dims), activation, slope)
    if dz is not None:
        _view3(dz, dims).copy_(g)
    s2 = (g * (_view3(x, dims).to(sd) - mean[:, None])).sum((0, 2)) if x is not None else g.new_zeros(dims[1])
    return g.sum((0, 2)), s2


@_dispatch.register(APPLY, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward_apply(dy, y, x, a, b, k, dx, dims, activation, slope):
    sd = stats_dtype(dy.dtype)
    g = _activation_grad(_view3(dy, dims).to(sd), None if y is None else _view3(y, dims), activation, slope)
    v = g * a[:, None]
    if b is not None:
        v = v + _view3(x, dims).to(sd) * b[:, None] + k[:, None]
    _view3(dx, dims).copy_(v)
    return dx


# ---------------------------------------------------------------------------------------------------- cpu (C++)
_cpu = dict(devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)


@_dispatch.register(STATS, "cpu", **_cpu)
def cpu_stats(x, dims):
    mean = torch.empty(dims[1], dtype=torch.float32)
    var = torch.empty_like(mean)
    _ext.cpu.batch_norm_stats(x.data_ptr(), mean.data_ptr(), var.data_ptr(), *dims, _ext.DTYPE_CODE[x.dtype])
    return mean, var


@_dispatch.register(AFFINE, "cpu", **_cpu)
def cpu_affine_act(x, residual, scale, shift, out, dims, activation, slope):
    _ext.cpu.channel_affine_act(x.data_ptr(), _addr(residual), _addr(scale), _addr(shift), out.data_ptr(), *dims,
                                activation, slope, _ext.DTYPE_CODE[x.dtype])
    return out


@_dispatch.register(REDUCE, "cpu", **_cpu)
def cpu_backward_reduce(dy, y, x, mean, dz, dims, activation, slope):
    s1 = torch.empty(dims[1], dtype=torch.float32)
    s2 = torch.zeros_like(s1)
    _ext.cpu.channel_act_backward_reduce(dy.data_ptr(), _addr(y), _addr(x), _addr(mean), _addr(dz), s1.data_ptr(),
                                         s2.data_ptr(), *dims, activation, slope, _ext.DTYPE_CODE[dy.dtype])
    return s1, s2


@_dispatch.register(APPLY, "cpu", **_cpu)
def cpu_backward_apply(dy, y, x, a, b, k, dx, dims, activation, slope):
    _ext.cpu.channel_act_backward_apply(dy.data_ptr(), _addr(y), _addr(x), a.data_ptr(), _addr(b), _addr(k),
                                        dx.data_ptr(), *dims, activation, slope, _ext.DTYPE_CODE[dy.dtype])
    return dx


# ---------------------------------------------------------------------------------------------------- triton
def merge_partials(pcount, pmean, pm2, positions: int):
    """Chan's merge of per-block partials [S, C] (counts [S, 1] or [S, C]), all at once:
    m = Σ n_i m_i / n,  M2 = Σ M2_i + Σ n_i (m_i − m)²;  returns (mean, biased variance) [C]."""
    mean = (pcount * pmean).sum(0) / positions
    m2 = pm2.sum(0) + (pcount * (pmean - mean).square()).sum(0)
    return mean, m2 / positions


def _triton_stats(x, dims):
    from dlcore.kernels import batch_norm

    return merge_partials(*batch_norm.stats_partials(x, dims), dims[0] * dims[2])


def _triton(kernel_fn: str):
    """kernels/batch_norm.py's launcher `kernel_fn` (same signature as the op's), imported at the first call."""
    def launch(*args):
        from dlcore.kernels import batch_norm

        return getattr(batch_norm, kernel_fn)(*args)
    return launch


for _name, _launch in ((STATS, _triton_stats), (AFFINE, _triton("apply")), (REDUCE, _triton("backward_reduce")),
                       (APPLY, _triton("backward_apply"))):
    _dispatch.register(_name, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                       available=_ext.triton_unavailable("batch_norm"))(_launch)


# ---------------------------------------------------------------------------------------------------- cuda (C++)


_cuda = dict(devices=("cuda",), dtypes=LOW, available=_ext.cuda_unavailable)


def _splits(dims, device) -> int:
    """Position splits of a reduction: about four blocks per SM in all, at least 1024 positions per split."""
    channel_blocks = dims[1] if dims[2] > 1 else -(-dims[1] // 32)
    want = -(-4 * torch.cuda.get_device_properties(device).multi_processor_count // channel_blocks)
    return max(1, min(want, -(-(dims[0] * dims[2]) // 1024)))


@_dispatch.register(STATS, "cuda", **_cuda)
def cuda_stats(x, dims):
    splits = _splits(dims, x.device)
    pcount, pmean, pm2 = (torch.empty((splits, dims[1]), dtype=torch.float32, device=x.device) for _ in range(3))
    with torch.cuda.device(x.device):
        _ext.cuda.batch_norm_stats_partials(x.data_ptr(), pcount.data_ptr(), pmean.data_ptr(), pm2.data_ptr(), *dims,
                                            splits, _ext.DTYPE_CODE[x.dtype], _ext.cuda_stream(x.device))
    return merge_partials(pcount, pmean, pm2, dims[0] * dims[2])


@_dispatch.register(AFFINE, "cuda", **_cuda)
def cuda_affine_act(x, residual, scale, shift, out, dims, activation, slope):
    with torch.cuda.device(x.device):
        _ext.cuda.channel_affine_act(x.data_ptr(), _addr(residual), _addr(scale), _addr(shift), out.data_ptr(), *dims,
                                     activation, slope, _ext.DTYPE_CODE[x.dtype], _ext.cuda_stream(x.device))
    return out


@_dispatch.register(REDUCE, "cuda", **_cuda)
def cuda_backward_reduce(dy, y, x, mean, dz, dims, activation, slope):
    splits = _splits(dims, dy.device)
    ps1, ps2 = (torch.empty((splits, dims[1]), dtype=torch.float32, device=dy.device) for _ in range(2))
    with torch.cuda.device(dy.device):
        _ext.cuda.channel_act_backward_reduce_partials(
            dy.data_ptr(), _addr(y), _addr(x), _addr(mean), _addr(dz), ps1.data_ptr(), ps2.data_ptr(), *dims, splits,
            activation, slope, _ext.DTYPE_CODE[dy.dtype], _ext.cuda_stream(dy.device))
    return ps1.sum(0), ps2.sum(0)


@_dispatch.register(APPLY, "cuda", **_cuda)
def cuda_backward_apply(dy, y, x, a, b, k, dx, dims, activation, slope):
    with torch.cuda.device(dy.device):
        _ext.cuda.channel_act_backward_apply(dy.data_ptr(), _addr(y), _addr(x), a.data_ptr(), _addr(b), _addr(k),
                                             dx.data_ptr(), *dims, activation, slope, _ext.DTYPE_CODE[dy.dtype],
                                             _ext.cuda_stream(dy.device))
    return dx


# ---------------------------------------------------------------------------------------------------- custom ops
def _launcher(name: str, t: torch.Tensor):
    return _dispatch.select(name, t.device, t.dtype)[1]


@torch.library.custom_op("dlcore::batch_norm_act", mutates_args=())
def batch_norm_act_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                      running_var: Optional[torch.Tensor], training: bool, eps: float, activation: int,
                      slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, μ, ρ, σ² biased) — μ, σ² of the batch when training, else the running ones. x, residual dense in one
    layout; weight, bias, running stats in the statistics dtype."""
    dims = channel_dims(x)
    if training:
        mean, var = _launcher(STATS, x)(x, dims)
    else:
        mean, var = running_mean.clone(), running_var.clone()
    invstd = (var + eps).rsqrt()
    scale = invstd * weight if weight is not None else invstd
    shift = -mean * scale if bias is None else bias - mean * scale
    y = torch.empty_like(x)
    _launcher(AFFINE, x)(x, residual, scale, shift, y, dims, activation, slope)
    return y, mean, invstd, var


@batch_norm_act_op.register_fake
def _(x, residual, weight, bias, running_mean, running_var, training, eps, activation, slope):
    stats = x.new_empty(x.shape[1], dtype=stats_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


@torch.library.custom_op("dlcore::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward_op(grad_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                               weight: Optional[torch.Tensor], mean: torch.Tensor, invstd: torch.Tensor,
                               training: bool, activation: int, slope: float, has_residual: bool,
                               needs_input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """(dx, d_residual, dγ, dβ); empty tensors for gradients not asked for (custom ops never return None)."""
    dims = channel_dims(x)
    grad_y = dense_like(grad_y, x)
    y_act = y if activation else None
    dz = torch.empty_like(x) if has_residual else None
    s1, s2 = _launcher(REDUCE, x)(grad_y, y_act, x, mean, dz, dims, activation, slope)
    dx = x.new_empty(0)
    if needs_input_grad:
        a = invstd * weight if weight is not None else invstd
        b = k = None
        if training:
            m = dims[0] * dims[2]
            b = -a * invstd.square() * s2 / m
            k = -a * s1 / m - b * mean
        # with a residual, dz = act'·dy is already written: read it (2 tensors) instead of dy and y (3)
        source, act = (dz, 0) if dz is not None else (grad_y, activation)
        dx = _launcher(APPLY, x)(source, y_act if act else None, x, a, b, k, torch.empty_like(x), dims, act, slope)
    return dx, (x.new_empty(0) if dz is None else dz), s2 * invstd, s1


@batch_norm_act_backward_op.register_fake
def _(grad_y, x, y, weight, mean, invstd, training, activation, slope, has_residual, needs_input_grad):
    return (torch.empty_like(x) if needs_input_grad else x.new_empty(0),
            torch.empty_like(x) if has_residual else x.new_empty(0), torch.empty_like(mean), torch.empty_like(mean))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _rm, _rv, training, eps, activation, slope = inputs
    y, mean, invstd, _var = output
    ctx.save_for_backward(x, y, weight, mean, invstd)
    ctx.conf = (training, activation, slope, residual is not None, eps)


def _differentiable_backward(grad_y, x, y, weight, mean, invstd, training, activation, slope, eps):
    """(dx, d_residual, dγ, dβ) from plain torch ops under autograd, for a backward with create_graph=True
    (gradient penalties such as WGAN-GP or R1 on a DCGAN discriminator, double backprop): the kernels' gradients
    are formed without autograd, so their second derivative would be missing. With z = x̂·γ + β (+ residual) and
    dz = act'(z)·dy (act' piecewise constant, read from y's sign as the kernels do): (dx, dγ) = autograd of x̂·γ
    against dz, x̂ = (x − μ)·(σ² + ε)^-½ with the batch's μ, σ² when training (functions of x) or the running ones
    (constants) in eval; d_residual = dz; dβ = Σ dz over all but the channel dim."""
    reduce = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)

    def scaled(x, weight):  # x̂·γ
        xs = x.to(mean.dtype)
        if training:
            mu = xs.mean(reduce, keepdim=True)
            inv = (xs.var(reduce, unbiased=False, keepdim=True) + eps).rsqrt()
        else:
            mu, inv = mean.detach().view(shape), invstd.detach().view(shape)
        z = (xs - mu) * inv
        return z if weight is None else z * weight.view(shape)

    dz = _activation_grad(grad_y, y.detach(), activation, slope)
    dx, dw = _eager.differentiable_grads(scaled, (x, weight), dz)
    return dx, dz, dw, dz.to(mean.dtype).sum(reduce)


def _backward(ctx, grad_y, _gm, _gi, _gv):
    x, y, weight, mean, invstd = ctx.saved_tensors
    training, activation, slope, has_residual, eps = ctx.conf
    if _eager.torch_ops_backward(grad_y):  # create_graph=True: gradients that autograd can differentiate again
        dx, dr, dw, db = _differentiable_backward(grad_y, x, y, weight, mean, invstd, training, activation, slope,
                                                  eps)
    else:
        dx, dr, dw, db = _batch_norm_act_backward(grad_y, x, y, weight, mean, invstd, training, activation, slope,
                                                  has_residual, ctx.needs_input_grad[0])
    return (dx if ctx.needs_input_grad[0] else None, dr if has_residual else None,
            dw if weight is not None else None, db if ctx.needs_input_grad[3] else None,
            None, None, None, None, None, None)


_batch_norm_act = _eager.eager_autograd(batch_norm_act_op, _setup_context, _backward)
_batch_norm_act_backward = _eager.direct(batch_norm_act_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def batch_norm_act(input: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, training: bool = False,
                   momentum: Optional[float] = 0.1, eps: float = 1e-5, *, residual: Optional[torch.Tensor] = None,
                   activation: str = "relu", negative_slope: float = 0.01,
                   num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act(F.batch_norm(input, …) + residual), as one fused op; the arguments before `*` are F.batch_norm's.

    input: [N, C, *] (NCHW or channels_last; the output keeps input's layout), floating point. weight, bias,
    running_mean, running_var: [C] (any floating dtype; the math runs in fp32, float64 for float64 input).
    residual: input's shape, dtype and device, added after the affine transform. activation: "relu",
    "leaky_relu" (negative_slope ≥ 0) or "identity". In training mode the running statistics (when given) are
    updated in place as torch does; num_batches_tracked is incremented when given, and momentum=None then uses the
    cumulative average 1/num_batches_tracked.
    """
    _checks.tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must be [N, C, *] with at least 2 dims, got shape {tuple(input.shape)}")
    c = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None:
            _checks.tensor(name, t, like=input, same_dtype=False)
            if tuple(t.shape) != (c,):
                raise ValueError(f"input has {c} channels (dim 1) but {name} has shape {tuple(t.shape)}; "
                                 f"expected ({c},)")
    if residual is not None:
        _checks.tensor("residual", residual, like=input)
        _checks.shape("residual", residual, input.shape)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if activation == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(f"negative_slope must be >= 0 (the backward reads the sign from the output), "
                         f"got {negative_slope}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var are required when training=False")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if training and t is not None and t.numel() > 1 and 0 in t.stride():
            # checked before anything is written: num_batches_tracked must not move without the statistics
            raise ValueError(f"{name} is updated in place and must not be an expanded tensor (stride 0)")
    if input.numel() == 0:  # torch's result: an empty output, the statistics untouched (a module's counter counts)
        if training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        z = F.batch_norm(input, running_mean, running_var, weight, bias, training, 0.0, eps)
        z = z if residual is None else z + residual
        return _activate(z, ACTIVATIONS[activation], negative_slope)
    count = input.numel() // c
    if training and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    sd = stats_dtype(input.dtype)
    x = dense_like(input)
    r = None if residual is None else dense_like(residual, x)
    def cast(t, detach=False):
        return None if t is None else (t.detach() if detach else t).to(sd)

    rm, rv = (None, None) if training else (cast(running_mean, True), cast(running_var, True))
    y, mean, _invstd, var = _batch_norm_act(x, r, cast(weight), cast(bias), rm, rv, bool(training),
                                            float(eps), ACTIVATIONS[activation], float(negative_slope))
    if training:
        _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count)
    return y


@torch.no_grad()
def _update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count: int):
    """torch's update: r ← (1 − f)·r + f·batch, f = momentum or 1/num_batches_tracked; variance unbiased."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is None and running_var is None:
        return
    factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
    if running_mean is not None:
        running_mean.mul_(1 - factor).add_(mean.detach().to(running_mean.dtype), alpha=factor)
    if running_var is not None:
        unbiased = var.detach() * (count / (count - 1))
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
