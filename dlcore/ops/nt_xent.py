"""Fused NT-Xent loss (SimCLR, Chen et al. 2020), forward and backward (issue 6):

    u_i = z_i/‖z_i‖,  s_ij = u_i·u_j/τ,  ℓ_i = −s_{i,p(i)} + log Σ_{j≠i} exp(s_ij),  L = mean_i ℓ_i

over M = 2N embeddings z [2N, d] whose rows i and i + N are the two views of one image (p(i) = (i + N) mod 2N).
Stock code materialises the 2N×2N similarity matrix (and its softmax for backward); here it exists only as tiles:
extra memory is O(N) (the per-row log-sum-exp) beyond the O(N·d) normalised embeddings.
Backward (P = row-wise softmax over j ≠ i, s symmetric):
    ∂L/∂u_i = 1/(Mτ)·( Σ_{j≠i} (P_ij + P_ji)·u_j − 2·u_{p(i)} ),   ∂L/∂z_i = (∂u_i − u_i·(u_i·∂u_i)) / ‖z_i‖.

Launchers (u: [M, d] fp32 contiguous, L2-normalised; the normalisation and its backward are O(M·d) PyTorch):
  forward(u, temperature) -> (lse [M], pos [M])        ℓ_i = lse_i − pos_i
  backward(u, lse, temperature, scale) -> du [M, d]    scale = g/(M·τ)
Backends: reference (the full matrix in plain PyTorch: the test oracle, float64 too), cpu (csrc/cpu/nt_xent.cpp),
triton (kernels/nt_xent.py, d ≤ 256); cuda C++ not written (a helper op).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcore import _checks, _dispatch, _eager, _ext

FORWARD, BACKWARD = "nt_xent", "nt_xent_backward"
for _name in (FORWARD, BACKWARD):
    _dispatch.define_op(_name, gpu_order=("triton",))
FLOATS = (torch.float32, torch.float64)


def _scores(u: torch.Tensor, temperature: float) -> torch.Tensor:
    s = u @ u.t() / temperature
    return s.masked_fill(torch.eye(u.shape[0], dtype=torch.bool, device=u.device), float("-inf"))


# ---------------------------------------------------------------------------------------------------- reference
@_dispatch.register(FORWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_forward(u, temperature):
    s = _scores(u, temperature)
    partner = (torch.arange(u.shape[0], device=u.device) + u.shape[0] // 2) % u.shape[0]
    return torch.logsumexp(s, 1), s.gather(1, partner[:, None])[:, 0]


@_dispatch.register(BACKWARD, "reference", devices=("cpu", "cuda"), dtypes=FLOATS)
def reference_backward(u, lse, temperature, scale):
    m = u.shape[0]
    s = _scores(u, temperature)
    w = torch.exp(s - lse[:, None]) + torch.exp(s - lse[None, :])  # P_ij + P_ji (0 on the diagonal)
    partner = (torch.arange(m, device=u.device) + m // 2) % m
    w[torch.arange(m, device=u.device), partner] -= 2.0
    return (w @ u) * scale


# ---------------------------------------------------------------------------------------------------- cpu (C++)
@_dispatch.register(FORWARD, "cpu", devices=("cpu",), dtypes=(torch.float32,), available=_ext.cpu_unavailable)
def cpu_forward(u, temperature):
    lse, pos = torch.empty(u.shape[0]), torch.empty(u.shape[0])
    _ext.cpu.nt_xent_forward(u.data_ptr(), lse.data_ptr(), pos.data_ptr(), u.shape[0], u.shape[1], 1.0 / temperature)
    return lse, pos


@_dispatch.register(BACKWARD, "cpu", devices=("cpu",), dtypes=(torch.float32,), available=_ext.cpu_unavailable)
def cpu_backward(u, lse, temperature, scale):
    du = torch.empty_like(u)
    _ext.cpu.nt_xent_backward(u.data_ptr(), lse.data_ptr(), du.data_ptr(), u.shape[0], u.shape[1], 1.0 / temperature,
                              scale)
    return du


# ---------------------------------------------------------------------------------------------------- triton
@_dispatch.register(FORWARD, "triton", devices=("cpu", "cuda"), dtypes=(torch.float32,),
                    available=_ext.triton_unavailable("nt_xent"))
def triton_forward(u, temperature):
    from dlcore.kernels import nt_xent

    return nt_xent.forward(u, temperature)


@_dispatch.register(BACKWARD, "triton", devices=("cpu", "cuda"), dtypes=(torch.float32,),
                    available=_ext.triton_unavailable("nt_xent"))
def triton_backward(u, lse, temperature, scale):
    from dlcore.kernels import nt_xent

    return nt_xent.backward(u, lse, temperature, scale)


# ---------------------------------------------------------------------------------------------------- custom ops
def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


TRITON_MAX_DIM = 256  # kernels/nt_xent.py MAX_DIM (not imported: triton may be missing)


@torch.library.custom_op("dlcore::nt_xent", mutates_args=())
def nt_xent_op(z: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss scalar in the math dtype, lse [M])."""
    u = F.normalize(z.to(_math_dtype(z.dtype)), dim=1).contiguous()
    lse, pos = _dispatch.select_within(FORWARD, u, TRITON_MAX_DIM)(u, temperature)
    return (lse - pos).mean(), lse


@nt_xent_op.register_fake
def _(z, temperature):
    dt = _math_dtype(z.dtype)
    return z.new_empty((), dtype=dt), z.new_empty(z.shape[0], dtype=dt)


@torch.library.custom_op("dlcore::nt_xent_backward", mutates_args=())
def nt_xent_backward_op(grad: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    zm = z.to(_math_dtype(z.dtype))
    norm = zm.norm(dim=1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
    u = (zm / norm).contiguous()
    scale = float(grad) / (z.shape[0] * temperature)
    du = _dispatch.select_within(BACKWARD, u, TRITON_MAX_DIM)(u, lse, temperature, scale)
    dz = (du - u * (u * du).sum(1, keepdim=True)) / norm  # through u = z/‖z‖
    return dz.to(z.dtype)


@nt_xent_backward_op.register_fake
def _(grad, z, lse, temperature):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, temperature = inputs
    ctx.save_for_backward(z, output[1])
    ctx.temperature = temperature


def _backward(ctx, grad_loss, _grad_lse):
    z, lse = ctx.saved_tensors
    if _eager.torch_ops_backward(grad_loss):  # create_graph=True: autograd of the reference loss mean(lse_i − s_i,partner(i))
        def loss(z):
            lse_ref, pos = reference_forward(F.normalize(z.to(_math_dtype(z.dtype)), dim=1), ctx.temperature)
            return (lse_ref - pos).mean()

        return _eager.differentiable_grads(loss, (z,), grad_loss)[0], None
    return _nt_xent_backward(grad_loss, z, lse, ctx.temperature), None


_nt_xent = _eager.eager_autograd(nt_xent_op, _setup_context, _backward)
_nt_xent_backward = _eager.direct(nt_xent_backward_op)


# ---------------------------------------------------------------------------------------------------- public
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of projections: z1[i] and z2[i] are the two views of image i.

    z1, z2: [N, d] (N ≥ 1, same shape, dtype and device; floating point), temperature τ > 0. Returns the mean over
    the 2N anchors of −log softmax_{j≠i}(s_ij)[positive] with s = cosine similarity / τ — the loss of Chen et al.
    (2020), in fp32 (float64 for float64 input), as a 0-dim tensor."""
    _checks.tensor("z1", z1)
    _checks.tensor("z2", z2, like=z1, like_name="z1")
    if z1.dim() != 2:
        raise ValueError(f"z1 must be [N, d], got shape {tuple(z1.shape)}")
    _checks.shape("z2", z2, z1.shape)
    if z1.shape[0] == 0 or z1.shape[1] == 0:
        raise ValueError(f"z1 is empty (shape {tuple(z1.shape)})")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    loss, _ = _nt_xent(torch.cat([z1, z2]), float(temperature))
    return loss
