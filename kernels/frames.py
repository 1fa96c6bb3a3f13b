"""Triton kernel of the frame-stack replay sample (the `triton` backend of dlcore/rl/frames.py's frame_stack_sample).

v1 (shipped): one launch assembles a whole batch. Program (b, h) with h = half·STACK + j writes frame j of the obs
(half 0) or next_obs (half 1) stack of sample b:
- the n-step walk (m = steps to the episode's end, at most N_STEP; Σ γᵏ r) is recomputed by every program of the
  sample (N_STEP scalar loads, cheaper than a second launch); program (b, 0) also stores reward, terminated and γᵐ;
- its frame slot = slot − min(back, steps since the episode start) (padding repeats the first frame, or is zeroed);
- the frame is copied as bytes in BLOCK pieces (frames of any dtype, passed as uint8).
The reference (torch ops) and the CPU backend (numba plan + C++ gather) compute the same batch; tests run this
kernel through Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton.language as tl

from dlcore.kernels._triton import AOTConfig, aot_signature, dual_kernel, gpu_tiles

GPU_BLOCK = 1024
INTERPRET_BLOCK = 1 << 16


@dual_kernel
def frame_stack_sample_kernel(INDEX, FRAMES, ENDED, REWARD, TERM, START, OUT, OUT_R, OUT_T, OUT_D, batch, cap,
                              frame_bytes, gamma, N_STEP: tl.constexpr, STACK: tl.constexpr,
                              ZERO_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    half = h // STACK
    j = h % STACK
    t = tl.load(INDEX + b)
    total = 0.0
    scale = 1.0
    m = 0
    done = 0
    for k in tl.static_range(N_STEP):  # Σ_{k<m} γᵏ r[t+k], stopping after the step that ends the episode
        s = (t + k) % cap
        live = done == 0
        total += tl.where(live, scale * tl.load(REWARD + s), 0.0)
        scale = tl.where(live, scale * gamma, scale)
        m += tl.where(live, 1, 0)
        done = tl.where(live & (tl.load(ENDED + s).to(tl.int32) != 0), 1, done)
    first = h == 0
    tl.store(OUT_R + b, total, mask=first)
    tl.store(OUT_T + b, tl.load(TERM + (t + m - 1) % cap).to(tl.float32), mask=first)
    tl.store(OUT_D + b, scale, mask=first)
    slot = tl.where(half == 0, t, (t + m) % cap)
    since = ((slot - tl.load(START + slot)) % cap + cap) % cap  # (a C remainder: make it non-negative)
    back = STACK - 1 - j
    src = FRAMES + ((slot - tl.minimum(back, since)) % cap + cap) % cap * frame_bytes
    dst = OUT + ((half * batch + b) * STACK + j).to(tl.int64) * frame_bytes
    pad = back > since
    offs = tl.arange(0, BLOCK)
    for start in range(0, frame_bytes, BLOCK):
        mask = offs < frame_bytes - start
        v = tl.load(src + start + offs, mask=mask)
        if ZERO_PAD:
            v = tl.where(pad, 0, v).to(tl.uint8)
        tl.store(dst + start + offs, v, mask=mask)


def sample(index, frames, ended, reward, terminated, episode_start, stack: int, n_step: int, gamma: float,
           zero_pad: bool):
    """(stacks [2, B, stack, *frame] in frames' dtype, reward, terminated, discount fp32 [B])."""
    batch = index.numel()
    device = index.device
    stacks = torch.empty((2, batch, stack, *frames.shape[1:]), dtype=frames.dtype, device=device)
    outs = [torch.empty(batch, dtype=torch.float32, device=device) for _ in range(3)]
    frame_bytes = frames[0].numel() * frames.element_size()
    frame_stack_sample_kernel.launch(
        (batch, 2 * stack), device, index, frames.view(torch.uint8), ended, reward, terminated, episode_start,
        stacks.view(torch.uint8), *outs, batch, frames.shape[0], frame_bytes, float(gamma), N_STEP=n_step,
        STACK=stack, ZERO_PAD=bool(zero_pad), BLOCK=GPU_BLOCK if gpu_tiles(index) else INTERPRET_BLOCK, num_warps=4)
    return (stacks, *outs)


def _aot_configs():
    """Atari: 4-frame stacks, 3-step returns, both paddings."""
    ptrs = {"INDEX": "*i64", "FRAMES": "*u8", "ENDED": "*i1", "REWARD": "*fp32", "TERM": "*i1", "START": "*i64",
            "OUT": "*u8", "OUT_R": "*fp32", "OUT_T": "*fp32", "OUT_D": "*fp32"}
    configs = []
    for zero_pad in (False, True):
        constexprs = dict(N_STEP=3, STACK=4, ZERO_PAD=zero_pad, BLOCK=GPU_BLOCK)
        configs.append(AOTConfig(frame_stack_sample_kernel,
                                 aot_signature(frame_stack_sample_kernel, ptrs, constexprs, floats=("gamma",),
                                               int64s=("cap", "frame_bytes")),
                                 constexprs, num_warps=4, label=f"frame stack sample n3 s4 zero_pad={zero_pad}"))
    return configs


AOT_CONFIGS = _aot_configs()
