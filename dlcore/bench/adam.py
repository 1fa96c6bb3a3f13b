"""Benchmark cases for the fused Adam: one optimizer step over ResNet-18's 11.7M parameters (62 tensors).

Peers: torch.optim.Adam/AdamW with fused=True (the baseline the issue names), foreach=True, and torch.compile of
the foreach step. Bytes per parameter and step: fp32 state reads p, g, m, v and writes p, m, v (28 B); bf16
state reads 4 + 4 + 2 + 2 and writes 4 + 2 + 2 (20 B).
"""
from __future__ import annotations

import itertools

import torch

import dlcore
from dlcore.bench.harness import DLCORE, Case
from dlcore.bench.shapes import resnet18_param_shapes


def _param_sets(n_sets: int, device: str, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        params = []
        for shape in resnet18_param_shapes():
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.05).to(device, dtype))
            p.grad = (torch.randn(shape, generator=gen) * 0.01).to(device, dtype)
            params.append(p)
        sets.append(params)
    return sets


def _rotating(steps):
    cycle = itertools.cycle(steps)
    return lambda: next(cycle)()


def _setup(device: str, dl_cls, torch_cls, dl_kwargs: dict, with_compile: bool):
    def setup(n_sets: int):
        variants = {}
        dl_opts = [dl_cls(ps, lr=1e-3, **dl_kwargs) for ps in _param_sets(n_sets, device)]
        variants[DLCORE] = _rotating([o.step for o in dl_opts])
        fused = [torch_cls(ps, lr=1e-3, fused=True) for ps in _param_sets(n_sets, device)]
        variants["torch fused"] = _rotating([o.step for o in fused])
        foreach = [torch_cls(ps, lr=1e-3, foreach=True) for ps in _param_sets(n_sets, device)]
        variants["torch foreach"] = _rotating([o.step for o in foreach])
        if with_compile:
            compiled = []
            for ps in _param_sets(n_sets, device):
                opt = torch_cls(ps, lr=1e-3, foreach=True)
                compiled.append(torch.compile(opt.step))
            variants["torch.compile(foreach)"] = _rotating(compiled)
        return variants

    return setup


def cases(device: str) -> list[Case]:
    n = sum(torch.Size(s).numel() for s in resnet18_param_shapes())
    gpu = device.startswith("cuda")
    return [
        Case("adam", "Adam fp32, ResNet-18 params (11.7M)", device,
             _setup(device, dlcore.optim.Adam, torch.optim.Adam, {}, with_compile=True),
             bytes=28 * n, baseline="torch fused", target=1.1 if gpu else 0.95,
             bandwidth_target=0.9 if gpu else None, ops=("adam",)),
        Case("adam", "AdamW bf16 state, ResNet-18 params", device,
             _setup(device, dlcore.optim.AdamW, torch.optim.AdamW, {"state_dtype": torch.bfloat16},
                    with_compile=False),
             bytes=20 * n, baseline="torch fused", target=None if gpu else 1.3, ops=("adam",),
             notes="dlcore keeps exp_avg/exp_avg_sq in bf16 (stochastic rounding); torch in fp32"),
        Case("adam", "Adam bf16 params + fp32 master, ResNet-18", device,
             _setup_master(device), bytes=28 * n, baseline="torch fused", ops=("adam",),  # 28 B as fp32
             quick=False, notes="dlcore: bf16 params, fp32 master + fp32 state; torch: fp32 params (same math)"),
    ]


def _setup_master(device: str):
    def setup(n_sets: int):
        def bf16_sets():
            sets = _param_sets(n_sets, device)
            for ps in sets:
                for p in ps:
                    p.data = p.data.bfloat16()
                    p.grad = p.grad.bfloat16()
            return sets

        dl_opts = [dlcore.optim.Adam(ps, lr=1e-3, master_weights=True, state_dtype=torch.float32)
                   for ps in bf16_sets()]
        fused = [torch.optim.Adam(ps, lr=1e-3, fused=True) for ps in _param_sets(n_sets, device)]
        return {DLCORE: _rotating([o.step for o in dl_opts]), "torch fused": _rotating([o.step for o in fused])}

    return setup
