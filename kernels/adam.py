"""Triton multi-tensor Adam / AdamW.

One launch per (device, dtype) group: the program id walks a chunk table of (tensor, first element) rows, the
tensor's addresses come from an int64 table and are cast to typed pointers in the kernel (apex's
multi_tensor_apply, without its fixed-size argument structs). Math, order and rounding follow the functor in
csrc/common/adam.h; the reference is dlcore/ops/adam.py.

v1 (shipped): one BLOCK of elements per program, fp32 math, optional stochastic rounding of bf16 state with the
same lowbias32 hash as the C++ backends (so results match them bit for bit when the fp32 math agrees).
"""
from __future__ import annotations

import torch
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, dual_kernel

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
GPU_BLOCK = 2048       # elements per program on a GPU: 8 per thread at 8 warps (16 per thread at 4 warps
GPU_WARPS = 8          # spilled the low-precision variants: 255 registers + 32 B stack, per the static check)
INTERPRET_BLOCK = 65536  # the interpreter costs ~5 µs per program: few, large programs


@dual_kernel
def adam_kernel(ptrs, numels, scal, chunks, grad_scale_ptr, found_inf_ptr,
                beta1, beta2, one_minus_beta1, one_minus_beta2, weight_decay, seed,
                P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    n = tl.load(numels + t)
    row = ptrs + 6 * t
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE)) + start
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE)) + start
    m_ptr = tl.load(row + 2).to(tl.pointer_type(S_DTYPE)) + start
    v_ptr = tl.load(row + 3).to(tl.pointer_type(S_DTYPE)) + start
    lr = tl.load(scal + 4 * t)
    alpha = tl.load(scal + 4 * t + 1)    # lr·√(1 − β2ᵗ)/(1 − β1ᵗ)
    eps_hat = tl.load(scal + 4 * t + 2)  # ε·√(1 − β2ᵗ)
    step = tl.load(scal + 4 * t + 3)

    if HAS_FOUND_INF:  # GradScaler found an inf/NaN: the whole step is skipped (read on the device: graph-safe)
        n = tl.where(tl.load(found_inf_ptr) == 0.0, n, 0)
    # 64-bit math once per program (the chunk's base pointers), 32-bit offsets per element: fewer registers.
    offs = tl.arange(0, BLOCK)
    mask = offs < n - start

    grad_mult = 1.0
    if MAXIMIZE:
        grad_mult = -1.0
    if HAS_GRAD_SCALE:
        grad_mult = grad_mult / tl.load(grad_scale_ptr)
    if MASTER:
        master_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32)) + start
        theta = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_mult
    if DECOUPLED:
        theta = theta * (1.0 - lr * weight_decay)          # AdamW: θ ← θ(1 − lr·wd)
    else:
        grad = grad + weight_decay * theta                  # Adam: g ← g + wd·θ
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m + one_minus_beta1 * (grad - m)                    # m ← β1 m + (1 − β1) g   (1 − β from the host, in
    v = beta2 * v + one_minus_beta2 * grad * grad           # v ← β2 v + (1 − β2) g²   double: 1 − 0.999f is off)
    vhat = v
    if AMSGRAD:
        vmax_ptr = tl.load(row + 4).to(tl.pointer_type(S_DTYPE)) + start
        vhat = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
    theta = theta - alpha * (m / (tl.sqrt(vhat) + eps_hat))  # = lr/(1−β1ᵗ) · m / (√v̂/√(1−β2ᵗ) + ε)

    if STOCHASTIC:
        # key = mix32(seed ^ mix32(t·φ + step)); r = mix32(i ^ key); low 16 bits round m, high 16 bits round v.
        k = t.to(tl.uint32) * 0x9E3779B9 + step.to(tl.uint32)
        k = k ^ (k >> 16)
        k = k * 0x7FEB352D
        k = k ^ (k >> 15)
        k = k * 0x846CA68B
        k = k ^ (k >> 16)
        k = k ^ tl.cast(seed, tl.uint32)  # (a seed of 1 arrives as a constexpr: the runtime specialises 1)
        k = k ^ (k >> 16)
        k = k * 0x7FEB352D
        k = k ^ (k >> 15)
        k = k * 0x846CA68B
        k = k ^ (k >> 16)
        r = (offs.to(tl.uint32) + start.to(tl.uint32)) ^ k  # element index within the tensor
        r = r ^ (r >> 16)
        r = r * 0x7FEB352D
        r = r ^ (r >> 15)
        r = r * 0x846CA68B
        r = r ^ (r >> 16)
        m_out = (m.to(tl.uint32, bitcast=True) + (r & 0xFFFF)) & 0xFFFF0000
        m_out = tl.where(tl.abs(m) < float("inf"), m_out.to(tl.float32, bitcast=True), m)
        v_out = (v.to(tl.uint32, bitcast=True) + (r >> 16)) & 0xFFFF0000
        v_out = tl.where(tl.abs(v) < float("inf"), v_out.to(tl.float32, bitcast=True), v)
        vhat_out = (vhat.to(tl.uint32, bitcast=True) + (r >> 16)) & 0xFFFF0000
        vhat_out = tl.where(tl.abs(vhat) < float("inf"), vhat_out.to(tl.float32, bitcast=True), vhat)
    else:
        m_out = m
        v_out = v
        vhat_out = vhat
    tl.store(m_ptr + offs, m_out.to(S_DTYPE), mask=mask)
    tl.store(v_ptr + offs, v_out.to(S_DTYPE), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, vhat_out.to(S_DTYPE), mask=mask)
    if MASTER:
        tl.store(master_ptr + offs, theta, mask=mask)
    tl.store(p_ptr + offs, theta.to(P_DTYPE), mask=mask)


def launch(plan, scal, hyper, *, param_dtype, state_dtype, amsgrad, master, grad_scale=None, found_inf=None):
    """Triton launcher with the signature every Adam backend shares (see dlcore/ops/adam.py)."""
    device = plan.ptrs.device
    dummy = scal  # any fp32 tensor on the device stands in for an absent pointer; never read
    adam_kernel.launch(
        (plan.n_chunks,), device,
        plan.ptrs, plan.numels, scal, plan.chunks,
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        hyper.beta1, hyper.beta2, 1.0 - hyper.beta1, 1.0 - hyper.beta2, hyper.weight_decay, hyper.seed,
        P_DTYPE=TL_DTYPE[param_dtype], S_DTYPE=TL_DTYPE[state_dtype], AMSGRAD=amsgrad, MASTER=master,
        DECOUPLED=hyper.decoupled, MAXIMIZE=hyper.maximize, HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, STOCHASTIC=state_dtype == torch.bfloat16, BLOCK=plan.chunk_size,
        num_warps=GPU_WARPS,
    )


def block_size(device: torch.device) -> int:
    return GPU_BLOCK if torch.device(device).type == "cuda" else INTERPRET_BLOCK


def _aot_configs():
    sig = {"ptrs": "*i64", "numels": "*i64", "scal": "*fp32", "chunks": "*i64", "grad_scale_ptr": "*fp32",
           "found_inf_ptr": "*fp32", "beta1": "fp32", "beta2": "fp32", "one_minus_beta1": "fp32",
           "one_minus_beta2": "fp32", "weight_decay": "fp32",
           "seed": "i32"}
    configs = []
    # Every shipped (param, state) dtype pair with the heaviest flags (AMSGrad, master weights, grad scaling).
    for p_dt in (torch.float32, torch.bfloat16, torch.float16):
        for s_dt in (torch.float32, torch.bfloat16, torch.float16):
            const = dict(P_DTYPE=TL_DTYPE[p_dt], S_DTYPE=TL_DTYPE[s_dt], AMSGRAD=True, MASTER=p_dt != torch.float32,
                         DECOUPLED=True, MAXIMIZE=False, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True,
                         STOCHASTIC=s_dt == torch.bfloat16, BLOCK=GPU_BLOCK)
            sig_full = dict(sig, **{k: "constexpr" for k in const})
            configs.append(AOTConfig(adam_kernel, sig_full, const, num_warps=GPU_WARPS,
                                     label=f"adam p={p_dt} state={s_dt}".replace("torch.", "")))
    return configs


AOT_CONFIGS = _aot_configs()
