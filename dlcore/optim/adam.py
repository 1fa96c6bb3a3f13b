"""dlcore.optim.Adam / AdamW: drop-in replacements for torch.optim.Adam / AdamW over the fused multi-tensor step
(dlcore/ops/adam.py). One launch per (device, dtype) bucket of a param group.

Beyond torch's arguments:
  state_dtype     dtype of exp_avg / exp_avg_sq / max_exp_avg_sq (default: the param's, as torch). bfloat16
                  state is rounded stochastically, so small updates survive in expectation; it moves 8 fewer
                  bytes per fp32 parameter and step.
  master_weights  keep an fp32 copy of every bf16/fp16 parameter (state['master_param']); the step updates it
                  and writes the parameter rounded to nearest.
Complex parameters are stepped as torch does, their real and imaginary parts as independent reals (view_as_real).
State dicts load both ways with torch.optim.Adam/AdamW (extra keys are ignored by torch). GradScaler passes
grad_scale / found_inf to step() (the unscale and the skip happen inside the kernel). With capturable=True the
step counters live on the parameters' device and nothing syncs with the host, so the step can be captured in a
CUDA graph. Parameters may be DTensors (FSDP2): their local shards are stepped.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from dlcore.ops import adam as adam_op

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_LOW = (torch.bfloat16, torch.float16)  # the parameter dtypes master_weights keeps an fp32 copy of


def _real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A complex tensor as its [..., 2] real view (torch.optim.Adam's rule: real and imaginary parts are stepped
    as independent reals); anything else as it is."""
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (it shares storage), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _like(param: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` as `dtype` on param's device with param's layout (DTensor when param is one)."""
    out = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format)
    with torch.no_grad():
        out.copy_(value)
    return out


class Adam(torch.optim.Optimizer):
    """Adam (Kingma & Ba, 2014) with torch.optim.Adam's arguments, fused into one kernel launch per bucket.

    Args:
        params: iterable of parameters or of dicts defining param groups.
        lr (float or Tensor): learning rate (default 1e-3). A tensor lr is read on the device when capturable.
        betas (Tuple[float, float]): coefficients for the running averages of the gradient and its square.
        eps (float): added to the denominator (default 1e-8).
        weight_decay (float): L2 penalty (Adam) or decoupled decay rate (AdamW / decoupled_weight_decay=True).
        amsgrad (bool): use the maximum of past squared-gradient averages (Reddi et al.).
        maximize (bool): maximise the objective instead of minimising it.
        capturable (bool): keep step counters on the device (CUDA-graph safe, no host sync).
        decoupled_weight_decay (bool): AdamW's decay θ ← θ(1 − lr·wd).
        state_dtype (torch.dtype, optional): float32, bfloat16 (stochastic rounding) or float16 optimizer state.
        master_weights (bool): fp32 master copies of low-precision parameters.
        foreach, fused: accepted for signature compatibility with torch; dlcore always fuses.
        differentiable: not supported (raises).
    """

    def __init__(self, params: Iterable, lr: Union[float, torch.Tensor] = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 state_dtype: Optional[torch.dtype] = None, master_weights: bool = False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise NotImplementedError("dlcore Adam: differentiable=True is not supported; use torch.optim.Adam")
        if state_dtype not in _STATE_DTYPES:
            raise TypeError(f"state_dtype must be one of {_STATE_DTYPES}, got {state_dtype}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable, differentiable=False,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay, state_dtype=state_dtype,
                        master_weights=master_weights,
                        sr_seed=int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))  # torch.manual_seed reproducible
        super().__init__(params, defaults)
        self._step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if not isinstance(params, set):  # (torch's add_param_group raises for a set: sets have no order)
            # listed once, here: a generator (`model.head.parameters()`) would otherwise reach torch exhausted
            params = param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        state_dtype = param_group.get("state_dtype", self.defaults["state_dtype"])
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"{type(self).__name__}: param {i} of the new group has dtype {p.dtype}; "
                                "only floating-point or complex parameters can be optimized")
            if isinstance(p, torch.Tensor) and p.is_complex() and (state_dtype is not None or not p.is_contiguous()):
                raise ValueError(f"{type(self).__name__}: param {i} is complex: it needs contiguous storage and "
                                 "the default state_dtype (its real and imaginary parts are stepped as reals)")
        devices = {p.device for p in params if isinstance(p, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"{type(self).__name__}: a param group holds parameters on several devices "
                             f"({sorted(map(str, devices))}); put each device's parameters in its own group")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("state_dtype", "master_weights", "sr_seed", "decoupled_weight_decay", "capturable",
                        "maximize", "amsgrad", "foreach", "fused", "differentiable"):
                group.setdefault(key, self.defaults.get(key, False if key != "state_dtype" else None))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a dlcore or torch.optim.Adam/AdamW state dict. States keep their own precision (torch's loader
        would round them to the parameter dtype first)."""
        originals = {idx: dict(s) for idx, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for idx, p in zip(saved_group["params"], group["params"]):
                if idx in originals:
                    self._restore_state(p, originals[idx], group)

    def _state_dtype(self, p: torch.Tensor, group: dict) -> torch.dtype:
        return group["state_dtype"] or p.dtype

    def _restore_state(self, p: torch.Tensor, saved: dict, group: dict) -> None:
        state = self.state[p]
        for key in _STATE_KEYS:
            if key in saved:
                state[key] = _like(p, saved[key], self._state_dtype(p, group))
        if "master_param" in saved:
            state["master_param"] = _like(p, saved["master_param"], torch.float32)
        step = saved.get("step", 0.0)
        step = float(step) if not isinstance(step, torch.Tensor) else step.detach().float().reshape(())
        state["step"] = self._new_step(p, group, step)

    def _new_step(self, p: torch.Tensor, group: dict, value=0.0) -> torch.Tensor:
        device = p.device if group["capturable"] else "cpu"
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=torch.float32).clone()
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0:
            sd = self._state_dtype(p, group)
            state["step"] = self._new_step(p, group)
            state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:  # e.g. loaded from a non-AMSGrad run
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
        if group["master_weights"] and p.dtype in _LOW and "master_param" not in state:
            state["master_param"] = _like(p, p.detach(), torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        name = type(self).__name__
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple, list[tuple]] = {}  # (device, dtypes, master?) -> one row of tensors per param
            amsgrad = group["amsgrad"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                # The states are ours (made with the param's layout); the gradient is the user's: check what the
                # kernels rely on, cheaply (dlcore.functional.adam checks everything).
                if g.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam")
                if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                    raise ValueError(f"{name}: a parameter of shape {tuple(p.shape)} is not dense "
                                     f"(stride {p.stride()}); dlcore needs contiguous or channels_last parameters")
                if g.dtype != p.dtype or g.shape != p.shape:
                    raise TypeError(f"{name}: a gradient is {g.dtype} {tuple(g.shape)} but its parameter is "
                                    f"{p.dtype} {tuple(p.shape)}")
                if g.stride() != p.stride():  # e.g. a hand-set grad: give it the parameter's layout
                    g = torch.empty_like(p, memory_format=torch.preserve_format).copy_(g)
                state = self._init_state(p, group)
                master = state.get("master_param")
                row = (p, g, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] if amsgrad else None,
                       state["step"], master)
                if type(p) not in _PLAIN:
                    row = tuple(map(_local, row))  # DTensors: their shards
                if p.is_complex():
                    row = tuple(map(_real, row))
                key = (p.device, row[0].dtype, row[2].dtype, master is not None)
                rows = buckets.get(key)
                if rows is None:
                    rows = buckets[key] = []
                rows.append(row)
            if len({k[0] for k in buckets}) > 1:
                raise ValueError(f"{name}: param group {gi} holds parameters on several devices "
                                 f"({sorted(str(k[0]) for k in buckets)}); give each device its own group")
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            for (device, *_, has_master), rows in buckets.items():
                params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, masters = map(list, zip(*rows))
                adam_op.run_adam_op(
                    params, grads, exp_avgs, exp_avg_sqs, max_sqs if amsgrad else [], steps,
                    masters if has_master else [],
                    adam_op.check_float_scalar(grad_scale, "grad_scale", device),
                    adam_op.check_float_scalar(found_inf, "found_inf", device),
                    0.0 if isinstance(lr, torch.Tensor) else float(lr), lr if isinstance(lr, torch.Tensor) else None,
                    float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), bool(amsgrad),
                    bool(group["maximize"]), bool(group["decoupled_weight_decay"]), group["sr_seed"] + 7919 * gi)
        return loss


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter): Adam with decoupled weight decay θ ← θ(1 − lr·wd), default wd 1e-2.
    Arguments as torch.optim.AdamW plus dlcore's state_dtype and master_weights (see Adam)."""

    def __init__(self, params: Iterable, lr: Union[float, torch.Tensor] = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 state_dtype: Optional[torch.dtype] = None, master_weights: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, state_dtype=state_dtype, master_weights=master_weights)
