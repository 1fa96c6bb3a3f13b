"""Fused Adam / AdamW: the plain-PyTorch reference, the four backends behind the dispatch point, and the
functional entry point ``dlcore.functional.adam`` (torch.optim.adam.adam's list-of-tensors form).

The math (csrc/common/adam.h has it with the formulas) is one table-driven multi-tensor step:
  slots    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (AMSGrad), master (fp32 copy of low-precision params)
  scal     fp32 [n, 4] per tensor: lr, α = lr·√(1 − β2ᵗ)/(1 − β1ᵗ), ε̂ = ε·√(1 − β2ᵗ), t  (on the device when
           capturable); the update is θ ← θ − α·m/(√v̂ + ε̂), torch's lr/(1 − β1ᵗ)·m/(√v̂/√(1 − β2ᵗ) + ε)
Every backend's launcher has the signature of `reference_launch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from dlcore import _dispatch, _ext
from dlcore._multi_tensor import address, cached_plan

OP = "adam"
SLOTS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_CHUNK = 1 << 16   # elements per OpenMP task: large enough to amortise scheduling, small enough to balance
CUDA_CHUNK = 1 << 14  # elements per CUDA block (256 threads × 64)
_M32 = 0xFFFFFFFF

_dispatch.define_op(OP, gpu_order=("cuda", "triton"))  # not yet measured on a GPU: CUDA C++ first


@dataclass(frozen=True)
class AdamHyper:
    beta1: float
    beta2: float
    weight_decay: float
    decoupled: bool
    maximize: bool
    seed: int = 0  # stochastic-rounding stream (bf16 state only), < 2**31


def scalar_table(lr: Union[float, torch.Tensor], beta1: float, beta2: float, eps: float,
                 steps: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-tensor [lr, α = lr·√(1−β2ᵗ)/(1−β1ᵗ), ε̂ = ε·√(1−β2ᵗ), t], in double on the host from CPU step counters,
    or with tensor ops on the device when the steps (or lr) live there (capturable: no sync, CUDA-graph safe)."""
    if steps[0].device.type == "cpu" and not (isinstance(lr, torch.Tensor) and lr.device.type != "cpu"):
        lr_f = float(lr)
        ts = torch.stack(steps).reshape(-1).tolist()
        by_step = {}  # the tensors of a group usually share their step: one row computed per distinct t
        for t in ts:
            if t not in by_step:
                bc2_sqrt = math.sqrt(1.0 - beta2 ** t)
                by_step[t] = (lr_f, lr_f * bc2_sqrt / (1.0 - beta1 ** t), eps * bc2_sqrt, t)
        if len(by_step) == 1:
            (row,) = by_step.values()
            table = torch.tensor(row, dtype=dtype).repeat(len(steps), 1)
        else:
            table = torch.tensor([by_step[t] for t in ts], dtype=dtype)
        return table.to(device, non_blocking=True)
    t = torch.stack([s.reshape(()) for s in steps]).to(device=device, dtype=torch.float64 if dtype == torch.float64
                                                                              else torch.float32)
    lr_t = torch.as_tensor(lr, device=device, dtype=t.dtype).reshape(()).expand_as(t)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t))
    alpha = lr_t * bc2_sqrt / (1.0 - torch.pow(beta1, t))
    return torch.stack([lr_t, alpha, eps * bc2_sqrt, t], dim=1).to(dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, float64-capable): the test oracle and the `reference` backend.
# ---------------------------------------------------------------------------------------------------------------
def mix32(x):
    """lowbias32 on Python ints or int64 tensors (low 32 bits), as csrc/common/dtype.h."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _store(value: torch.Tensor, dtype: torch.dtype, random16: Optional[torch.Tensor]) -> torch.Tensor:
    """Round fp32 `value` to `dtype`: stochastically for bf16 state (random16 given), else to nearest."""
    if random16 is None or dtype != torch.bfloat16:
        return value.to(dtype)
    value = value.float()  # fp64 params (math in fp64): round to fp32 first, the bit trick reads 32-bit words
    bits = value.view(torch.int32).to(torch.int64) & _M32
    rounded = (((bits + random16) & 0xFFFF0000) - ((bits + random16) & 0x80000000) * 2).to(torch.int32)
    sr = rounded.view(torch.float32)
    return torch.where(torch.isfinite(value), sr, value).to(torch.bfloat16)


def reference_launch(slots, scal, hyper: AdamHyper, *, param_dtype, state_dtype, amsgrad, master,
                     grad_scale=None, found_inf=None):
    """One Adam step over every tensor in `slots` (lists per SLOTS entry), in the kernels' order of operations.
    Math in fp32, or fp64 when the params are fp64."""
    if found_inf is not None and float(found_inf) != 0.0:
        return
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, masters = slots
    math_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    grad_mult = (-1.0 if hyper.maximize else 1.0) / (1.0 if grad_scale is None else float(grad_scale))
    stochastic = state_dtype == torch.bfloat16
    for i, (lr, alpha, eps_hat, step) in enumerate(scal.tolist()):
        p = params[i]
        theta = (masters[i] if master else p).to(math_dtype)
        grad = grads[i].to(math_dtype) * grad_mult
        if hyper.decoupled:
            theta = theta * (1.0 - lr * hyper.weight_decay)
        else:
            grad = grad + hyper.weight_decay * theta
        m = exp_avgs[i].to(math_dtype)
        m = m + (1.0 - hyper.beta1) * (grad - m)
        v = hyper.beta2 * exp_avg_sqs[i].to(math_dtype) + (1.0 - hyper.beta2) * grad * grad
        vhat = torch.maximum(max_sqs[i].to(math_dtype), v) if amsgrad else v
        theta = theta - alpha * (m / (vhat.sqrt() + eps_hat))
        r = None
        if stochastic:
            key = mix32(hyper.seed ^ mix32((i * 0x9E3779B9 + int(step)) & _M32))
            idx = torch.arange(p.numel(), dtype=torch.int64, device=p.device).reshape(p.shape)
            r = mix32(idx ^ key)
        exp_avgs[i].copy_(_store(m, state_dtype, None if r is None else r & 0xFFFF))
        exp_avg_sqs[i].copy_(_store(v, state_dtype, None if r is None else r >> 16))
        if amsgrad:
            max_sqs[i].copy_(_store(vhat, state_dtype, None if r is None else r >> 16))
        if master:
            masters[i].copy_(theta)
        p.copy_(theta)


_dispatch.register(OP, "reference", devices=("cpu", "cuda"), dtypes=KERNEL_DTYPES + (torch.float64,))(
    reference_launch)


# ---------------------------------------------------------------------------------------------------------------
# Compiled backends: same signature, the plan tables from dlcore/_multi_tensor.py.
# ---------------------------------------------------------------------------------------------------------------
def _native_args(plan, scal, hyper, param_dtype, state_dtype, amsgrad, master, grad_scale, found_inf):
    return dict(ptrs=plan.ptrs.data_ptr(), numels=plan.numels.data_ptr(), scal=address(scal),
                chunks=plan.chunks.data_ptr(), n_chunks=plan.n_chunks, chunk_size=plan.chunk_size,
                param_dtype=_ext.DTYPE_CODE[param_dtype], state_dtype=_ext.DTYPE_CODE[state_dtype],
                amsgrad=amsgrad, master=master, beta1=hyper.beta1, beta2=hyper.beta2,
                one_minus_beta1=1.0 - hyper.beta1, one_minus_beta2=1.0 - hyper.beta2,
                weight_decay=hyper.weight_decay, decoupled=hyper.decoupled, maximize=hyper.maximize,
                seed=hyper.seed, grad_scale_ptr=address(grad_scale), found_inf_ptr=address(found_inf))


@_dispatch.register(OP, "cpu", devices=("cpu",), dtypes=KERNEL_DTYPES, available=_ext.cpu_unavailable)
def cpu_launch(slots, scal, hyper, *, param_dtype, state_dtype, amsgrad, master, grad_scale=None,
               found_inf=None):
    plan = cached_plan(slots, CPU_CHUNK, torch.device("cpu"))
    _ext.cpu.adam_step(**_native_args(plan, scal, hyper, param_dtype, state_dtype, amsgrad, master, grad_scale,
                                      found_inf))


def cpu_counting_launch(slots, steps, lr: float, eps: float, hyper, *, param_dtype, state_dtype, amsgrad, master,
                        grad_scale=None, found_inf=None):
    """The whole step in one C++ call: the step counters (fp32 CPU tensors, a 7th slot of the plan) are
    incremented and the scalar rows derived there, as _adam_impl and scalar_table do with ~6 tensor ops. The
    Python around a large CPU step runs with cold caches, so each op removed saves several times its warm cost."""
    plan = cached_plan([*slots, steps], CPU_CHUNK, torch.device("cpu"))
    args = _native_args(plan, None, hyper, param_dtype, state_dtype, amsgrad, master, grad_scale, found_inf)
    _ext.cpu.adam_step(**args, counts_steps=True, n_tensors=len(steps), lr=lr, eps=eps)


@_dispatch.register(OP, "cuda", devices=("cuda",), dtypes=KERNEL_DTYPES, available=_ext.cuda_unavailable)
def cuda_launch(slots, scal, hyper, *, param_dtype, state_dtype, amsgrad, master, grad_scale=None,
                found_inf=None):
    device = slots[0][0].device
    plan = cached_plan(slots, CUDA_CHUNK, device)
    with torch.cuda.device(device):
        _ext.cuda.adam_step(**_native_args(plan, scal, hyper, param_dtype, state_dtype, amsgrad, master,
                                           grad_scale, found_inf), stream=_ext.cuda_stream(device))


@_dispatch.register(OP, "triton", devices=("cpu", "cuda"), dtypes=KERNEL_DTYPES,
                    available=_ext.triton_unavailable("adam"))
def triton_launch(slots, scal, hyper, *, param_dtype, state_dtype, amsgrad, master, grad_scale=None,
                  found_inf=None):
    from dlcore.kernels import adam as kernel

    device = slots[0][0].device
    plan = cached_plan(slots, kernel.block_size(device), device)
    kernel.launch(plan, scal, hyper, param_dtype=param_dtype, state_dtype=state_dtype, amsgrad=amsgrad,
                  master=master, grad_scale=grad_scale, found_inf=found_inf)


# ---------------------------------------------------------------------------------------------------------------
# The custom op (one opaque node for torch.compile) and the functional form.
# ---------------------------------------------------------------------------------------------------------------
def _adam_impl(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
            exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor],
            master_params: list[torch.Tensor], grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
            lr: float, lr_tensor: Optional[torch.Tensor], beta1: float, beta2: float, eps: float,
            weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool, seed: int) -> None:
    """dlcore::adam_ — validated inputs (see `adam`); empty lists stand for absent AMSGrad / master tensors."""
    n = len(params)
    device, param_dtype, state_dtype = params[0].device, params[0].dtype, exp_avgs[0].dtype
    backend, launch = _dispatch.select(OP, device, param_dtype)
    if state_dtype not in KERNEL_DTYPES + ((torch.float64,) if backend == "reference" else ()):
        raise TypeError(f"adam: state dtype {state_dtype} is not supported by backend {backend!r}")
    hyper = AdamHyper(beta1, beta2, weight_decay, decoupled_weight_decay, maximize, seed & 0x7FFFFFFF)
    none = [None] * n
    slots = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else none,
             master_params if master_params else none]
    kinds = dict(param_dtype=param_dtype, state_dtype=state_dtype, amsgrad=amsgrad, master=bool(master_params),
                 grad_scale=grad_scale, found_inf=found_inf)
    if backend == "cpu" and _counts_on_host(state_steps, lr_tensor):
        cpu_counting_launch(slots, state_steps, float(lr if lr_tensor is None else lr_tensor), eps, hyper, **kinds)
        return
    torch._foreach_add_(state_steps, 1.0)
    table_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
    scal = scalar_table(lr if lr_tensor is None else lr_tensor, beta1, beta2, eps, state_steps, device, table_dtype)
    if any(p.numel() for p in params):  # empty tensors have no chunks; a launch of zero programs is not valid
        launch(slots, scal, hyper, **kinds)
    if found_inf is not None:  # a skipped step does not count, as in torch's fused Adam
        torch._foreach_sub_(state_steps, [found_inf.to(s.device) for s in state_steps])


def _counts_on_host(steps: list[torch.Tensor], lr_tensor: Optional[torch.Tensor]) -> bool:
    """Whether the C++ twin can count the steps itself: fp32 counters of one element in host memory (dlcore's
    optimizers make them so; the functional form may be handed others), and lr a number or a host tensor."""
    if lr_tensor is not None and lr_tensor.device.type != "cpu":
        return False
    f32, cpu = torch.float32, torch.device("cpu")
    return all(s.dtype == f32 and s.device == cpu and s.numel() == 1 for s in steps)


_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "master_params")
adam_op = torch.library.custom_op("dlcore::adam_", mutates_args=_MUTATED)(_adam_impl)


def run_adam_op(*args) -> None:
    """torch.ops.dlcore.adam_ under torch.compile; in eager mode its implementation directly, with the version
    counters of the mutated tensors bumped in one call (the custom-op wrapper costs ~1 ms per step for 62
    parameters, most of it bumping them one by one)."""
    if torch.compiler.is_compiling():
        return adam_op(*args)
    params, _, exp_avgs, exp_avg_sqs, max_sqs, steps, masters = args[:7]
    # before the step, while the caches still hold these tensor objects (a large step evicts them)
    torch._C._increment_version([*params, *exp_avgs, *exp_avg_sqs, *max_sqs, *steps, *masters])
    _adam_impl(*args)


@adam_op.register_fake
def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, grad_scale,
               found_inf, lr, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
               seed) -> None:
    return None


def check_float_scalar(t: Optional[torch.Tensor], name: str, device: torch.device) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise TypeError(f"adam: {name} must be a one-element tensor, got {type(t).__name__}")
    return t.to(device=device, dtype=torch.float32).reshape(())


def _check_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, amsgrad):
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        if len(lst) != n:
            raise ValueError(f"adam: {name} has {len(lst)} tensors but params has {n}")
    if amsgrad and len(max_exp_avg_sqs) != n:
        raise ValueError(f"adam: amsgrad needs {n} max_exp_avg_sqs, got {len(max_exp_avg_sqs)}")
    if master_params is not None and len(master_params) != n:
        raise ValueError(f"adam: master_params has {len(master_params)} tensors but params has {n}")
    device, param_dtype, state_dtype = params[0].device, params[0].dtype, exp_avgs[0].dtype
    for i in range(n):
        p, g = params[i], grads[i]
        if not p.is_floating_point():
            raise TypeError(f"adam: params[{i}] has dtype {p.dtype}; only floating-point tensors can be optimized")
        if p.device != device:
            raise ValueError(f"adam: params[{i}] is on {p.device} but params[0] is on {device}; "
                             "one call takes tensors of one device")
        if p.dtype != param_dtype:
            raise TypeError(f"adam: params[{i}] is {p.dtype} but params[0] is {param_dtype}")
        if p.is_sparse or g.is_sparse:
            raise RuntimeError(f"adam: params[{i}] has a sparse gradient; dlcore Adam supports dense gradients "
                               "only (use torch.optim.SparseAdam)")
        if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError(f"adam: params[{i}] is not dense (stride {p.stride()}); dlcore Adam needs contiguous "
                             "or channels_last parameters")
        if g.dtype != param_dtype:
            raise TypeError(f"adam: grads[{i}] is {g.dtype} but params[{i}] is {param_dtype}")
        others = [("grads", g), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])]
        if amsgrad:
            others.append(("max_exp_avg_sqs", max_exp_avg_sqs[i]))
        if master_params is not None:
            if param_dtype == torch.float32:  # (fp64 params with fp64 masters: the reference oracle of the tests)
                raise ValueError("adam: master_params are fp32 copies of bf16/fp16 params; params are float32")
            others.append(("master_params", master_params[i]))
            want = torch.float64 if param_dtype == torch.float64 else torch.float32  # fp64: the reference oracle
            if master_params[i].dtype != want:
                raise TypeError(f"adam: master_params[{i}] is {master_params[i].dtype}; master weights are {want}")
        for name, t in others:
            if t.device != device:
                raise ValueError(f"adam: {name}[{i}] is on {t.device} but params[{i}] is on {device}")
            if t.shape != p.shape or t.stride() != p.stride():
                raise ValueError(f"adam: {name}[{i}] has shape {tuple(t.shape)} stride {t.stride()} but "
                                 f"params[{i}] has {tuple(p.shape)} stride {p.stride()}")
            if name.startswith("exp_avg") or name == "max_exp_avg_sqs":
                if t.dtype != state_dtype:
                    raise TypeError(f"adam: {name}[{i}] is {t.dtype} but exp_avgs[0] is {state_dtype}")
                if not t.is_floating_point():
                    raise TypeError(f"adam: {name}[{i}] has dtype {t.dtype}; optimizer state must be floating point")


def adam(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
         exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], state_steps: list[torch.Tensor],
         *, lr: Union[float, torch.Tensor] = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
         decoupled_weight_decay: bool = False, master_params: Optional[list[torch.Tensor]] = None,
         grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
         seed: int = 0) -> None:
    """One fused Adam/AdamW step over lists of tensors, in place (torch.optim.adam.adam's functional form).

    All tensors share one device; params are float32, bfloat16 or float16 (float64 on the reference backend),
    contiguous or channels_last; grads match their params; the states (exp_avg, exp_avg_sq, max_exp_avg_sq) share
    one float dtype and each param's shape and layout. ``state_steps`` (one-element float tensors) are incremented
    here, as torch does; when ``found_inf`` is non-zero nothing changes. ``master_params`` are fp32 copies of
    low-precision params that the step updates (the params receive them rounded to nearest). bf16 state is rounded
    stochastically with the stream ``seed``. Runs as the custom op ``torch.ops.dlcore.adam_``.
    """
    if len(params) == 0:
        return
    _check_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params, amsgrad)
    device = params[0].device
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    run_adam_op(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
            list(max_exp_avg_sqs) if amsgrad else [], list(state_steps),
            list(master_params) if master_params is not None else [],
            check_float_scalar(grad_scale, "grad_scale", device), check_float_scalar(found_inf, "found_inf", device),
            float(lr) if lr_tensor is None else 0.0, lr_tensor, float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(amsgrad), bool(maximize), bool(decoupled_weight_decay), int(seed))
