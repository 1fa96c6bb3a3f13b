"""One Triton function, two ways to run it: compiled (`triton.jit`) for CUDA tensors and through Triton's
interpreter for CPU tensors, chosen per call from the tensors' device rather than from TRITON_INTERPRET at import
time. Kernels built this way call no other @triton.jit function (the interpreter cannot call a compiled helper),
so shared device code is written inline.

Each kernel module lists the configurations it ships (`AOT_CONFIGS`); dlcore/_static_check.py compiles every
one of them ahead of time for sm_90 and fails the tests on a register spill or a shared-memory overflow.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


class DualKernel:
    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.compiled = JITFunction(fn)
        self._interpreted = None

    @property
    def interpreted(self) -> InterpretedFunction:
        if self._interpreted is None:
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def launch(self, grid, device: torch.device, *args, **kwargs):
        runner = self.compiled if torch.device(device).type == "cuda" else self.interpreted
        return runner[grid](*args, **kwargs)


def dual_kernel(fn) -> DualKernel:
    return DualKernel(fn)


@dataclass
class AOTConfig:
    """One shipped configuration: the signature's types (Triton strings, e.g. "*fp32", "i64"), the constexprs,
    and launch options."""
    kernel: DualKernel
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    options: dict = field(default_factory=dict)


def triton_version() -> str:
    return triton.__version__
