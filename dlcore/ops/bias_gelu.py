"""Fused bias + activation + dropout, forward and backward (issues 5 and 3): y = dropout(act(x + b)) with act ∈
{GELU (erf), GELU (tanh), ReLU, identity} — the transformer's feed-forward activation, AlexNet's classifier
(Linear + ReLU + Dropout) and plain dropout (no bias, identity).

A feed-forward matmul runs without its bias (x·Wᵀ); this op adds the bias and applies the activation (and the
dropout) in one pass, and its backward gives dx = dy·keep/(1−p)·act'(x + b) and db = Σ_rows dx in one pass,
recomputing act' from the saved pre-bias input rather than storing an activation or a mask.

Launcher signature shared by every backend (x: [rows, cols] contiguous; bias: None or [cols] in the math dtype —
fp32, float64 for float64 inputs; activation: a code of ACTIVATIONS (0 GELU erf, 1 GELU tanh, 2 ReLU, 3 identity);
dropout_p, seed:
dropout after the activation, element (row, col) kept iff Philox4x32-10(key = seed, counter = (col, row, 0, 0))[0]
≥ round(p·2³²) — dlcore.ops.attention.philox_keep — so every backend drops the same elements, and backward
regenerates the mask instead of storing it):
  forward(x, bias, activation, dropout_p, seed) -> y                        (x's dtype)
  backward(grad_y, x, bias, activation, dropout_p, seed) -> (grad_x, grad_bias in the math dtype)
Formulas, u = x + b:  exact  gelu(u) = ½u(1 + erf(u/√2)),   gelu'(u) = Φ(u) + u·φ(u);
                      tanh   gelu(u) = ½u(1 + t), t = tanh(√(2/π)(u + 0.044715u³)),
                             gelu'(u) = ½(1 + t) + ½u(1 − t²)·√(2/π)(1 + 3·0.044715u²);
                      relu   max(u, 0), relu'(u) = [u > 0];   identity  u, 1.

Backends
  reference  plain PyTorch in the math dtype (the test oracle; float64 gradcheck).
  cpu        csrc/cpu/bias_gelu.cpp: OpenMP over rows, vectorised polynomial tanh/erf, fp32/bf16/fp16 storage.
  triton     kernels/bias_gelu.py: 2-D tiles, per-tile bias-gradient partials.
  cuda       not written (a helper op: Triton's kernel is the GPU path): reported unavailable.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from dlcore import _checks, _dispatch, _eager, _ext
from dlcore._philox import draw_seed

FORWARD, BACKWARD = "bias_gelu", "bias_gelu_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton",))
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW = (torch.float32, torch.float16, torch.bfloat16)
# activation codes, shared with csrc/cpu/bias_gelu.cpp and kernels/bias_gelu.py
GELU, GELU_TANH, RELU, IDENTITY = 0, 1, 2, 3
ACTIVATIONS = {"gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU, "identity": IDENTITY}
_TANH_K = math.sqrt(2.0 / math.pi)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _drop(t: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """t·keep/(1 − p) with the Philox keep mask of a [rows, cols] tensor (see the module docstring)."""
    if dropout_p <= 0:
        return t
    from dlcore.ops.attention import philox_keep

    keep = philox_keep(seed, 1, 1, t.shape[0], t.shape[1], dropout_p, device=t.device)[0, 0]
    return torch.where(keep, t / (1.0 - dropout_p), 0.0) if dropout_p < 1 else torch.zeros_like(t)


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    """(seed, threshold, scale) as the C++ twin takes them."""
    if dropout_p <= 0:
        return 0, 0, 1.0
    return seed, min(int(round(dropout_p * 2 ** 32)), 2 ** 32), (1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0)


# ---------------------------------------------------------------------------------------------------- reference
def _pre_activation(x, bias):
    u = x.to(math_dtype(x.dtype))
    return u + bias if bias is not None else u


@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(x, bias, activation, dropout_p=0.0, seed=0):
    u = _pre_activation(x, bias)
    y = (F.gelu(u, approximate="tanh" if activation == GELU_TANH else "none") if activation in (GELU, GELU_TANH)
         else u.relu() if activation == RELU else u)
    return _drop(y, dropout_p, seed).to(x.dtype)


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(grad_y, x, bias, activation, dropout_p=0.0, seed=0):
    u = _pre_activation(x, bias)
    if activation == GELU_TANH:
        t = torch.tanh(_TANH_K * (u + 0.044715 * u ** 3))
        grad = 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * _TANH_K * (1 + 3 * 0.044715 * u * u)
    elif activation == GELU:
        grad = 0.5 * (1 + torch.erf(u / math.sqrt(2.0))) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
    elif activation == RELU:
        grad = (u > 0).to(u.dtype)
    else:
        grad = torch.ones_like(u)
    dx = _drop(grad_y.to(u.dtype), dropout_p, seed) * grad
    return dx.to(x.dtype), dx.sum(0)


# ---------------------------------------------------------------------------------------------------- cpu (C++)
@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)
def cpu_forward(x, bias, activation, dropout_p=0.0, seed=0):
    y = torch.empty_like(x)
    _ext.cpu.bias_gelu_forward(x.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(), *x.shape,
                               activation, _ext.DTYPE_CODE[x.dtype], *_dropout_args(dropout_p, seed))
    return y


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=LOW, available=_ext.cpu_unavailable)
def cpu_backward(grad_y, x, bias, activation, dropout_p=0.0, seed=0):
    dx = torch.empty_like(x)
    db = torch.empty(x.shape[1], dtype=torch.float32)
    _ext.cpu.bias_gelu_backward(grad_y.data_ptr(), x.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                dx.data_ptr(), db.data_ptr(), *x.shape, activation, _ext.DTYPE_CODE[x.dtype],
                                *_dropout_args(dropout_p, seed))
    return dx, db


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                    available=_ext.triton_unavailable("bias_gelu"))
def triton_forward(x, bias, activation, dropout_p=0.0, seed=0):
    from dlcore.kernels import bias_gelu

    return bias_gelu.forward(x, bias, activation, dropout_p, seed)


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=LOW,
                    available=_ext.triton_unavailable("bias_gelu"))
def triton_backward(grad_y, x, bias, activation, dropout_p=0.0, seed=0):
    from dlcore.kernels import bias_gelu

    return bias_gelu.backward(grad_y, x, bias, activation, dropout_p, seed)


# ---------------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("dlcore::bias_gelu", mutates_args=())
def bias_gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor], activation: int, dropout_p: float,
                 seed: int) -> torch.Tensor:
    _, launch = _dispatch.select(FORWARD, x.device, x.dtype)
    return launch(x, bias, activation, dropout_p, seed)


@bias_gelu_op.register_fake
def _(x, bias, activation, dropout_p, seed):
    return torch.empty_like(x)


@torch.library.custom_op("dlcore::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(grad_y: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                          activation: int, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, launch = _dispatch.select(BACKWARD, x.device, x.dtype)
    dx, db = launch(grad_y.contiguous(), x, bias, activation, dropout_p, seed)
    return dx, db.to(math_dtype(x.dtype))


@bias_gelu_backward_op.register_fake
def _(grad_y, x, bias, activation, dropout_p, seed):
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=math_dtype(x.dtype))


def _setup_context(ctx, inputs, output):
    x, bias, activation, dropout_p, seed = inputs
    # plain dropout (identity, no bias): its backward reads no value of x (act' = 1, the mask is regenerated), so x
    # is not kept (inplace dropout overwrites it; and memory) and grad_y stands in for its shape and dtype
    ctx.x_free = activation == IDENTITY and bias is None
    ctx.save_for_backward(None if ctx.x_free else x, bias)
    ctx.conf = (activation, dropout_p, seed)


def _differentiable_backward(grad_y, x, bias, activation, dropout_p, seed):
    """(dx, db) from plain torch ops under autograd, for a backward with create_graph=True (MAML's inner step
    through Linear + ReLU, gradient penalties, double backprop): autograd of the reference forward (the same
    Philox mask, regenerated from the seed) against dy; plain dropout is the mask times dy."""
    if x is None:
        return _drop(grad_y, dropout_p, seed), None
    return tuple(_eager.differentiable_grads(lambda x, b: reference_forward(x, b, activation, dropout_p, seed),
                                             (x, bias), grad_y))


def _backward(ctx, grad_y):
    x, bias = ctx.saved_tensors
    if _eager.torch_ops_backward(grad_y):  # create_graph=True: gradients that autograd can differentiate again
        dx, db = _differentiable_backward(grad_y, x, bias, *ctx.conf)
        return dx, (db if ctx.needs_input_grad[1] else None), None, None, None
    if ctx.x_free:
        grad_y = x = grad_y.contiguous()
    dx, db = _bias_gelu_backward(grad_y, x, bias, *ctx.conf)
    return dx, (db if bias is not None and ctx.needs_input_grad[1] else None), None, None, None


_bias_gelu = _eager.eager_autograd(bias_gelu_op, _setup_context, _backward)
_bias_gelu_backward = _eager.direct(bias_gelu_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def bias_act(input: torch.Tensor, bias: Optional[torch.Tensor] = None, activation: str = "relu",
             dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """dropout(act(input + bias), dropout_p, training) in one pass; act: "gelu", "gelu_tanh", "relu" or
    "identity" (bias None + identity = plain dropout).

    input: [..., C] floating point; bias: [C] or None (any floating dtype; math in fp32, float64 for float64 input);
    dropout: Philox-seeded from torch's generator (torch.manual_seed reproduces it; the mask is regenerated in
    backward, never stored; identity in eval mode and at p = 0). Returns input's shape and dtype."""
    _checks.tensor("input", input)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    p = float(dropout_p) if training else 0.0
    code = ACTIVATIONS[activation]
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the bias broadcasts over the last)")
    if bias is None and code == IDENTITY and p == 0.0:
        return input  # nothing to do: exactly the identity (as F.dropout in eval mode)
    if p > 0 and _eager.in_transform():  # torch's dropout, whose mask vmap draws per its `randomness` mode (a
        # Philox seed is one integer, which .item() cannot read from a batched draw)
        return F.dropout(bias_act(input, bias, activation, 0.0), p)
    seed = draw_seed(p)
    cols = input.shape[-1]
    if bias is not None:
        _checks.tensor("bias", bias, like=input, same_dtype=False)
        _checks.shape("bias", bias, (cols,))
        bias = _checks.dense_vector(bias, math_dtype(input.dtype))
    x2 = input.reshape(math.prod(input.shape[:-1]), cols).contiguous()  # (-1 is ambiguous when cols = 0)
    if x2.numel() == 0:
        return reference_forward(x2, bias, code).view_as(input)
    return _bias_gelu(x2, bias, code, p, seed).view_as(input)  # (view_as: view(torch.Size) costs ~2.4 µs)


def bias_gelu(input: torch.Tensor, bias: Optional[torch.Tensor] = None, approximate: str = "none",
              dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """dropout(gelu(input + bias), dropout_p, training) as torch.nn.functional would compute it, in one pass
    (approximate: 'none' (erf) or 'tanh'); see bias_act."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return bias_act(input, bias, "gelu_tanh" if approximate == "tanh" else "gelu", dropout_p, training)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """F.dropout with a Philox mask regenerated in backward (never stored); exactly the identity when not training
    or p = 0. inplace=True writes the result into input and returns it, as torch does (the kernel's output is
    copied back: the same memory for the caller, not less traffic)."""
    out = bias_act(input, None, "identity", p, training)
    return input.copy_(out) if inplace and out is not input else out


def _skinny_host() -> bool:
    """Whether this host's BLAS leaves the skinny shapes to us: DLCORE_SKINNY_GEMM=1/0 if set, else an AMD CPU.
    torch's x86 builds call MKL, which runs few-row fp32 GEMMs far below peak on AMD (our kernel 1.1–3.4× it on
    the 2-core EPYC VM) but well on Intel (2-core Xeon VM with AVX-512, 2026-12-02: ours 0.84–0.96× MKL on every
    shape from 1×768×2304 to 64×512×2048; AlexNet fc6 fwd+bwd 0.84× eager with it, 0.99× without), so Intel
    keeps torch's GEMM."""
    forced = os.environ.get("DLCORE_SKINNY_GEMM")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "AuthenticAMD" in line for line in f)
    except OSError:
        return False


SKINNY_HOST = _skinny_host()
SKINNY_MAX_ROWS = 64  # measured on the 2-core AMD VM: ours 1.1–3.4× torch's sgemm up to 64 rows, even at 128
# and from 2^18 multiply-adds: below, our call's ~13 µs of Python and binding cost more than the GEMV saves
# (1 row, 256×256: 15.4 µs against torch's 6.1; 256×1024: 22.5 against 25.6; 4 rows of 256×1024: 32.7 against 57.9)
SKINNY_MIN_MACS = 1 << 18


class _SkinnyLinear(torch.autograd.Function):
    """y = x·Wᵀ for x [M ≤ 64, K], W [N, K] fp32 on the CPU by csrc/cpu/skinny_linear.cpp (a stream over W, 16 FMAs
    per weight; torch's sgemm runs this shape far below peak), and dx = dy·W there too. dW = dyᵀ·x stays torch's:
    its output (as large as W) is written once either way, and a kernel of ours was not faster (page faults of the
    fresh output dominate both)."""

    @staticmethod
    def forward(ctx, x, weight):
        y = x.new_empty((x.shape[0], weight.shape[0]))
        _ext.cpu.skinny_linear(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], weight.shape[0],
                               x.shape[1])
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        if _eager.torch_ops_backward(grad_y):  # create_graph=True: torch's matmuls, which autograd differentiates again
            return (grad_y @ weight if ctx.needs_input_grad[0] else None,
                    grad_y.t() @ x if ctx.needs_input_grad[1] else None)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_y.contiguous()
            grad_x = torch.zeros_like(x)
            _ext.cpu.skinny_linear_grad_input(grad_y.data_ptr(), weight.data_ptr(), grad_x.data_ptr(), x.shape[0],
                                              weight.shape[0], x.shape[1])
        grad_w = grad_y.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def _skinny(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether F.linear(input, weight) runs our skinny GEMM: few rows of fp32 on the CPU (AVX-512 builds, on a
    host where it beats torch's BLAS: SKINNY_HOST), enough multiply-adds, the cpu backend the one chosen (so
    use_backend("reference") stays pure torch), not under torch.compile or a torch.func transform / forward-AD
    level, and not under CPU autocast (where torch's linear computes in the autocast dtype and returns it)."""
    return (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
            and _eager.autocast_dtype(input) is None
            and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous() and input.dim() >= 1
            and input.shape[-1] == weight.shape[1] and 0 < input.numel() <= SKINNY_MAX_ROWS * weight.shape[1]
            and input.numel() * weight.shape[0] >= SKINNY_MIN_MACS and not torch.compiler.is_compiling()
            and not _eager._transformed()
            and getattr(_ext.cpu, "simd", None) == "avx512" and SKINNY_HOST
            and _dispatch.select(FORWARD, input.device, input.dtype)[0] == "cpu")


def _matmul_nt(input: torch.Tensor, weight: torch.Tensor, skinny: Optional[bool] = None) -> torch.Tensor:
    """F.linear(input, weight): our skinny GEMM where _skinny says so (`skinny`: its answer, when known), torch's
    otherwise (which also raises torch's errors for mismatched shapes)."""
    if _skinny(input, weight) if skinny is None else skinny:
        x2 = input.reshape(-1, weight.shape[1]).contiguous()
        return _SkinnyLinear.apply(x2, weight).view(*input.shape[:-1], weight.shape[0])
    return F.linear(input, weight)


def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch.nn.functional.linear. On the CPU, fp32 inputs of at most 64 rows (and 2^18 multiply-adds) run
    dlcore's skinny GEMM, forward and input gradient, with the bias added after (decoding one token, acting on one
    observation: 1.1–2.6× torch's sgemm there, e.g. GPT-2's LM head at one row 8.0 against 14.7 ms on the AMD VM);
    everything else is F.linear, bias fused into torch's GEMM."""
    skinny = _skinny(input, weight)
    if bias is not None and (not skinny or bias.dtype != input.dtype):  # (torch's error for a bias of another dtype;
        return F.linear(input, weight, bias)                            # `y + bias` would promote silently)
    y = _matmul_nt(input, weight, skinny)
    return y if bias is None else y + bias


def linear_act(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: str = "relu", dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """dropout(act(F.linear(input, weight, bias))): the matmul without its bias, then the fused bias + activation
    (+ dropout). On the CPU, fp32 inputs of at most 64 rows use dlcore's skinny GEMMs for the matmul's forward and
    its input gradient. 16-bit (or autocast): F.linear adds the bias, before its rounding (_eager.bias_in_gemm)."""
    if _eager.bias_in_gemm(input, bias):
        return bias_act(F.linear(input, weight, bias), None, activation, dropout_p, training)
    return bias_act(_matmul_nt(input, weight), bias, activation, dropout_p, training)


def linear_gelu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                approximate: str = "none", dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """dropout(gelu(F.linear(input, weight, bias))): the matmul without its bias, then the fused bias + GELU
    (+ dropout)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return linear_act(input, weight, bias, "gelu_tanh" if approximate == "tanh" else "gelu", dropout_p, training)
