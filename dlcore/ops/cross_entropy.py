"""Softmax cross-entropy with ignore_index and label smoothing, chunked over the vocabulary, and the fused linear +
cross-entropy of a language model's output layer that never materialises the full logits (issue 5).

With V classes, target t and smoothing ε (torch's definition), per row:
    lse = log Σ_j e^{z_j},   loss = lse − (1 − ε)·z_t − (ε/V)·Σ_j z_j,   ∂loss/∂z_j = softmax_j − ε/V − (1 − ε)·[j = t]
and rows whose target is ignore_index contribute neither loss nor gradient; 'mean' divides by the rows that count.

Launcher signature shared by every backend (logits [rows, V] with a contiguous last dim; target int64 [rows]):
  forward(logits, target, ignore_index, smoothing, grad, grad_scale) -> (loss fp32 [rows], lse fp32 [rows])
      grad: None, or a [rows, V] buffer (it may be logits itself) that also receives ∂loss/∂z · grad_scale
  backward(logits, target, lse, scale, grad, ignore_index, smoothing) -> None
      writes ∂loss/∂z · scale[row] into grad (scale fp32 [rows], possibly an expanded scalar)

Fused linear + cross-entropy (`linear_cross_entropy`): for each chunk of rows, logits = x·Wᵀ + b into one reused
buffer, the forward kernel turns them into ∂loss/∂logits in place, then dx = dlogits·W and dW += dlogitsᵀ·x,
db += Σ dlogits — all inside the forward, as Liger-Kernel does, so that backward only scales the saved gradients by
the incoming scalar. Peak extra memory: one [chunk, V] buffer instead of [rows, V] logits, their log-softmax and
their gradient.

Backends
  reference  plain PyTorch (float64 for float64 logits, else fp32 math).
  cpu        csrc/cpu/cross_entropy.cpp: OpenMP over rows, vectorised polynomial exp, fp32/bf16/fp16 logits.
  triton     kernels/cross_entropy.py: online softmax over vocabulary chunks, one kernel for both directions.
  cuda       not written (a helper op: Triton's kernel is the GPU path): reported unavailable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from dlcore import _checks, _dispatch, _eager, _ext

FORWARD, BACKWARD = "cross_entropy", "cross_entropy_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton",))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------- reference
def _gatherable(target, ignore_index):
    """target with ignored rows sent to class 0 (masked by the caller): ignore_index may be any integer, in
    [0, C) or past it (torch allows both), so clamping negatives alone does not make it an index."""
    return torch.where(target == ignore_index, 0, target)


def _reference_grad(z, target, lse, scale, ignore_index, smoothing):
    ignored = target == ignore_index
    g = torch.exp(z - lse[:, None]) - smoothing / z.shape[1]
    g.scatter_add_(1, _gatherable(target, ignore_index)[:, None], torch.full_like(lse[:, None], -(1.0 - smoothing)))
    return torch.where(ignored[:, None], 0.0, g * scale[:, None])


@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(logits, target, ignore_index, smoothing, grad, grad_scale):
    z = logits.to(math_dtype(logits.dtype))
    lse = torch.logsumexp(z, 1)
    z_t = z.gather(1, _gatherable(target, ignore_index)[:, None])[:, 0]
    loss = torch.where(target == ignore_index, 0.0, lse - (1.0 - smoothing) * z_t - smoothing / z.shape[1] * z.sum(1))
    if grad is not None:
        scale = torch.full_like(lse, grad_scale)
        grad.copy_(_reference_grad(z, target, lse, scale, ignore_index, smoothing))
    stats = math_dtype(logits.dtype)
    return loss.to(stats), lse.to(stats)


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(logits, target, lse, scale, grad, ignore_index, smoothing):
    grad.copy_(_reference_grad(logits.to(lse.dtype), target, lse, scale, ignore_index, smoothing))


# ---------------------------------------------------------------------------------------------------- cpu (C++)
@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)
def cpu_forward(logits, target, ignore_index, smoothing, grad, grad_scale):
    rows, V = logits.shape
    loss = torch.empty(rows, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if grad is not None and grad.stride(0) != logits.stride(0):
        raise ValueError("cpu cross_entropy: the gradient buffer must have the logits' row stride")
    _ext.cpu.cross_entropy_forward(logits.data_ptr(), logits.stride(0), target.data_ptr(), loss.data_ptr(),
                                   lse.data_ptr(), 0 if grad is None else grad.data_ptr(), grad_scale, rows, V,
                                   ignore_index, smoothing, _ext.DTYPE_CODE[logits.dtype])
    return loss, lse


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)
def cpu_backward(logits, target, lse, scale, grad, ignore_index, smoothing):
    rows, V = logits.shape
    _ext.cpu.cross_entropy_backward(logits.data_ptr(), logits.stride(0), target.data_ptr(), lse.data_ptr(),
                                    scale.data_ptr(), scale.stride(0), grad.data_ptr(), rows, V, ignore_index,
                                    smoothing, _ext.DTYPE_CODE[logits.dtype])


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                    available=_ext.triton_unavailable("cross_entropy"))
def triton_forward(logits, target, ignore_index, smoothing, grad, grad_scale):
    from dlcore.kernels import cross_entropy

    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    scale = None if grad is None else torch.full((1,), grad_scale, device=logits.device).expand(rows)
    cross_entropy.launch(logits, target, loss, lse, grad, scale, ignore_index, smoothing, forward=True)
    return loss, lse


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                    available=_ext.triton_unavailable("cross_entropy"))
def triton_backward(logits, target, lse, scale, grad, ignore_index, smoothing):
    from dlcore.kernels import cross_entropy

    cross_entropy.launch(logits, target, None, lse, grad, scale, ignore_index, smoothing, forward=False)


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dlcore::cross_entropy", mutates_args=())
def cross_entropy_op(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                     smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, launch = _dispatch.select(FORWARD, logits.device, logits.dtype)
    return launch(logits, target, ignore_index, smoothing, None, 0.0)


@cross_entropy_op.register_fake
def _(logits, target, ignore_index, smoothing):
    stats = logits.new_empty(logits.shape[0], dtype=math_dtype(logits.dtype))
    return stats, torch.empty_like(stats)


@torch.library.custom_op("dlcore::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                              ignore_index: int, smoothing: float) -> torch.Tensor:
    _, launch = _dispatch.select(BACKWARD, logits.device, logits.dtype)
    # the kernels write the gradient with the logits' row stride: both dense (sliced logits overran a dense buffer,
    # expanded ones wrote every row into row 0)
    logits = logits.contiguous()
    grad = torch.empty_like(logits)
    launch(logits, target, lse, grad_loss.to(lse.dtype), grad, ignore_index, smoothing)
    return grad


@cross_entropy_backward_op.register_fake
def _(grad_loss, logits, target, lse, ignore_index, smoothing):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, target, ignore_index, smoothing = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.conf = (ignore_index, smoothing)


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    if _eager.torch_ops_backward(grad_loss):  # create_graph=True (Hessian-vector products, double backprop): autograd of the
        # reference's per-row losses, lse − (1 − ε)·z_t − (ε/V)·Σ z, whose gradient autograd can differentiate again
        (dz,) = _eager.differentiable_grads(lambda z: reference_forward(z, target, *ctx.conf, None, 0.0)[0],
                                            (logits,), grad_loss)
        return dz, None, None, None
    return _cross_entropy_backward(grad_loss, logits, target, lse, *ctx.conf), None, None, None


_cross_entropy = _eager.eager_autograd(cross_entropy_op, _ce_setup, _ce_backward)
_cross_entropy_backward = _eager.direct(cross_entropy_backward_op)


CPU_CHUNK_BYTES = 32 << 20  # logits per chunk on the CPU, at least (see _chunk_rows)


def _chunk_rows(rows: int, V: int, H: int, device_type: str = "cuda", itemsize: int = 4) -> int:
    """Rows per chunk: about as many logits as the input holds (Liger's rule, ⌈V/H⌉ chunks), a power of two, and
    at least 64 rows (thinner matmuls lose efficiency). On the CPU, where memory is plentiful and the matmuls are
    the cost, chunks of at least CPU_CHUNK_BYTES of logits: wider GEMMs run nearer peak and dW (V×H) is re-read
    once per chunk (2048×768 → 8192 fp32 fwd+bwd, AMD VM: 256 rows 461 ms, 512 433, 1024 426, 2048 425;
    torch's full logits 480)."""
    chunks = max(1, math.ceil(V / H))
    chunk = max(64, 1 << (math.ceil(rows / chunks) - 1).bit_length())
    if device_type == "cpu":
        fit = CPU_CHUNK_BYTES // max(1, V * itemsize)
        if fit >= 1:
            chunk = max(chunk, 1 << (fit.bit_length() - 1))  # the power of two at or below
    return max(1, min(rows, chunk))


@torch.library.custom_op("dlcore::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            target: torch.Tensor, ignore_index: int, smoothing: float, reduce_sum: bool,
                            grads: list[bool], chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """(loss, dx, dW, db) with the gradients of the reduced loss already formed (empty when not asked for)."""
    _, launch = _dispatch.select(FORWARD, x.device, x.dtype)
    rows, V = x.shape[0], weight.shape[0]
    want_x, want_w, want_b = grads
    want_any = want_x or want_w or want_b
    n_valid = int((target != ignore_index).sum()) if not reduce_sum else 1
    scale = 1.0 / n_valid if n_valid else float("nan")  # torch: a mean over no rows is nan
    low = x.dtype in (torch.float16, torch.bfloat16)
    acc = math_dtype(x.dtype)
    dx = torch.empty_like(x) if want_x else x.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_w else x.new_empty(0)
    db = torch.zeros(V, dtype=acc, device=x.device) if want_b else x.new_empty(0)
    losses = torch.empty(rows, dtype=acc, device=x.device)
    buffer = torch.empty((min(chunk_rows, rows), V), dtype=x.dtype, device=x.device)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        xs, logits = x[start:stop], buffer[:stop - start]
        if bias is None:
            torch.mm(xs, weight.t(), out=logits)
        else:
            torch.addmm(bias, xs, weight.t(), out=logits)
        loss, _ = launch(logits, target[start:stop], ignore_index, smoothing, logits if want_any else None, scale)
        losses[start:stop] = loss
        if want_x:
            torch.mm(logits, weight, out=dx[start:stop])
        if want_w:
            if low:
                dw += torch.mm(logits.t(), xs)
            else:
                dw.addmm_(logits.t(), xs)
        if want_b:
            db += logits.sum(0, dtype=acc)
    total = losses.sum() * scale
    return total, dx, (dw.to(weight.dtype) if want_w else dw), (db.to(bias.dtype) if want_b else db)


@linear_cross_entropy_op.register_fake
def _(x, weight, bias, target, ignore_index, smoothing, reduce_sum, grads, chunk_rows):
    return (x.new_empty((), dtype=math_dtype(x.dtype)), torch.empty_like(x) if grads[0] else x.new_empty(0),
            torch.empty_like(weight) if grads[1] else x.new_empty(0),
            torch.empty_like(bias) if grads[2] else x.new_empty(0))


def _lce_setup(ctx, inputs, output):
    x, weight, bias, target, ignore_index, smoothing, reduce_sum, grads, _ = inputs
    ctx.grads = grads
    ctx.conf = (ignore_index, smoothing, reduce_sum)
    # x, weight and bias are kept (references, no copies) only for a backward with create_graph=True; x, the
    # hidden states, would otherwise be freed after the forward (GPT-2 small, B8 T1024: 25 MB in fp32)
    ctx.save_for_backward(*output[1:], x, weight, bias, target)


def _lce_backward(ctx, grad_loss, *_):
    dx, dw, db, x, weight, bias, target = ctx.saved_tensors
    # (grad mode, not _eager.torch_ops_backward: the first-order path below is torch ops already, batched gradients
    # included)
    if torch.is_grad_enabled():  # create_graph=True (Hessian-vector products of an LM's loss, MAML): autograd of
        # F.linear and the cross-entropy's reference; it forms the [rows, V] logits the forward avoided
        ignore_index, smoothing, reduce_sum = ctx.conf

        def loss(x, weight, bias):
            rows = reference_forward(F.linear(x, weight, bias), target, ignore_index, smoothing, None, 0.0)[0]
            return rows.sum() if reduce_sum else rows.sum() / (target != ignore_index).sum()

        return (*_eager.differentiable_grads(loss, (x, weight, bias), grad_loss, needed=ctx.grads),) + (None,) * 6
    g = grad_loss.to(dx.dtype) if dx.numel() else grad_loss
    return (dx * g if ctx.grads[0] else None, dw * grad_loss.to(dw.dtype) if ctx.grads[1] else None,
            db * grad_loss.to(db.dtype) if ctx.grads[2] else None, None, None, None, None, None, None)


_linear_cross_entropy = _eager.eager_autograd(linear_cross_entropy_op, _lce_setup, _lce_backward)


# ---------------------------------------------------------------------------------------------------- public
def _check_common(ignore_index, label_smoothing, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _reduce(losses: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str,
            row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """'mean' divides by the rows that count, or by their class weights' sum (nll_loss's rule)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (row_weight.sum() if row_weight is not None else (target != ignore_index).sum())


def _as_rows(input: torch.Tensor) -> torch.Tensor:
    """Logits [N, C, d1, …] (or [C], [N, C]) as [rows, C] with a contiguous class dim: the K-dimensional form's
    class dim moved last (one copy, as torch's log_softmax over a strided dim reads it)."""
    if input.dim() == 1:
        return input[None]
    logits = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, input.shape[1])
    return logits if logits.stride(1) == 1 else logits.contiguous()


def _lse(logits: torch.Tensor) -> torch.Tensor:
    """Differentiable log Σ_j e^{z_j} per row from the kernel: at ε = 1 its loss is lse − mean_j z_j."""
    losses, _ = _cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device),
                               -100, 1.0)
    return losses + logits.to(losses.dtype).mean(1)


def _probability_loss(logits, probs, weight, smoothing):
    """Rows of −Σ_c w_c·t_c·log softmax(z)_c = lse·Σ_c w_c t_c − Σ_c w_c t_c z_c, t smoothed to (1−ε)t + ε/C."""
    acc = math_dtype(logits.dtype)
    t = probs.to(acc)
    if smoothing:
        t = t * (1.0 - smoothing) + smoothing / logits.shape[1]
    if weight is not None:
        t = t * weight.to(acc)
    return _lse(logits) * t.sum(1) - torch.linalg.vecdot(logits.to(acc), t)


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                  size_average: Optional[bool] = None, ignore_index: int = -100, reduce: Optional[bool] = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.cross_entropy (same arguments and semantics), without materialising log-softmax.

    input: [C], [N, C] or [N, C, d1, …, dk] logits (floating point). target: class indices of input's shape
    without C ([], [N] or [N, d1, …, dk]; integers in [0, C) or ignore_index), or class probabilities of input's
    shape (floating point; ignore_index does not apply). weight: optional [C] class weights ('mean' then divides by
    the weights of the rows that count, as torch does). size_average / reduce: torch's deprecated spellings of
    `reduction`. Returns the loss in fp32 (float64 for float64 input): a scalar, or target's shape (class indices)
    / input's shape without C (probabilities) with reduction='none'."""
    _checks.tensor("input", input)
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    _check_common(ignore_index, label_smoothing, reduction)
    if input.dim() == 0:
        raise ValueError("input must be [C], [N, C] or [N, C, d1, ...] logits, got a scalar")
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if n_classes == 0:
        raise ValueError("input has no classes (C = 0)")
    if weight is not None:
        _checks.tensor("weight", weight, like=input, same_dtype=False)
        _checks.shape("weight", weight, (n_classes,))
    logits = _as_rows(input)
    row_shape = (input.shape[0], *input.shape[2:]) if input.dim() > 1 else ()  # input's shape without C
    if isinstance(target, torch.Tensor) and target.is_floating_point():  # class probabilities
        _checks.tensor("target", target, like=input, same_dtype=False)
        if target.shape != input.shape:
            raise ValueError(f"target of class probabilities must have input's shape {tuple(input.shape)}, got "
                             f"{tuple(target.shape)} (class indices must be integers)")
        if ignore_index != -100:  # torch refuses it too: no row of probabilities is "ignored"
            raise ValueError(f"ignore_index ({ignore_index}) is not supported with class-probability targets")
        losses = _probability_loss(logits, _as_rows(target), weight, float(label_smoothing))
        if reduction == "none":
            return losses.view(row_shape)
        return losses.sum() if reduction == "sum" else losses.mean()  # 'mean': over rows, weights or not
    tgt = _checks.class_targets("target", target, n_classes, ignore_index, input)
    if tuple(tgt.shape) != row_shape:
        raise ValueError(f"target must have shape {row_shape} (input's without the class dim), got "
                         f"{tuple(target.shape)}")
    tgt = tgt.reshape(-1)
    smoothing = float(label_smoothing)
    row_weight = None
    if weight is None:
        losses, _ = _cross_entropy(logits, tgt, ignore_index, smoothing)
    else:
        # nll_loss's weighting: row i counts w[t_i] (0 when ignored). With smoothing ε, torch adds
        # (ε/C)·Σ_c w_c·(lse − z_c) = (ε/C)·(lse·Σw − z·w) per row to (1 − ε)·w[t]·(lse − z_t).
        nll, _ = _cross_entropy(logits, tgt, ignore_index, 0.0)
        w = weight.to(nll.dtype)
        kept = _gatherable(tgt, ignore_index)
        row_weight = torch.where(tgt == ignore_index, 0.0, w[kept])
        losses = nll * row_weight
        if smoothing:
            z = logits.to(nll.dtype)
            lse = nll + z.gather(1, kept[:, None])[:, 0]  # lse = nll + z_t (ignored rows masked below)
            smooth = torch.where(tgt == ignore_index, 0.0, lse * w.sum() - torch.mv(z, w))
            losses = (1.0 - smoothing) * losses + (smoothing / n_classes) * smooth
    out = _reduce(losses, tgt, ignore_index, reduction, row_weight)
    return out.view(row_shape) if reduction == "none" else out


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """cross_entropy(F.linear(input, weight, bias), target, ...) without forming the [N, V] logits.

    input: [..., H]; weight: [V, H] (e.g. a tied embedding); bias: [V] or None; target: input.shape[:-1] class
    indices. reduction 'mean' or 'sum' (the gradients are formed in the forward pass, so 'none' is not offered).
    chunk_rows: rows per chunk (default: about as many logits as the input has elements)."""
    _checks.tensor("input", input)
    _checks.tensor("weight", weight, like=input)
    _check_common(ignore_index, label_smoothing, reduction)
    if reduction == "none":
        raise ValueError("linear_cross_entropy supports reduction 'mean' or 'sum'; use cross_entropy for 'none'")
    if weight.dim() != 2 or input.dim() < 1 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must be [V, {input.shape[-1] if input.dim() else '?'}], got {tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, like=input)
        _checks.shape("bias", bias, (weight.shape[0],))
    low = _eager.autocast_dtype(input)
    if low is not None:  # the matmul runs in autocast's dtype, as F.linear would
        input, weight = input.to(low), weight.to(low)
        bias = bias.to(low) if bias is not None else None
    x = input.reshape(math.prod(input.shape[:-1]), input.shape[-1]).contiguous()  # (-1: ambiguous if K = 0)
    tgt = _checks.class_targets("target", target, weight.shape[0], ignore_index, input)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])}, got {tuple(target.shape)}")
    if x.numel() == 0:  # no rows, or no features (logits all zero): torch's own result
        return F.cross_entropy(F.linear(x, weight, bias), tgt.reshape(-1), ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    if _eager.in_transform():  # torch.func transforms: a composite they see
        # through (the fused op forms its gradients in the forward with out= matmuls, which they cannot take)
        return cross_entropy(F.linear(x, weight, bias), tgt.reshape(-1), ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing)
    track = torch.is_grad_enabled()
    grads = [track and input.requires_grad, track and weight.requires_grad,
             track and bias is not None and bias.requires_grad]
    rows = chunk_rows or _chunk_rows(x.shape[0], weight.shape[0], weight.shape[1], x.device.type, x.element_size())
    if rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    loss, *_ = _linear_cross_entropy(x, weight.contiguous(), bias, tgt.reshape(-1), ignore_index,
                                     float(label_smoothing), reduction == "sum", grads, rows)
    return loss
