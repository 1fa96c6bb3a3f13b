"""The compiled extensions, loaded once. A missing or broken build is recorded with its reason (shown by
`dlcore info` and in the error a user gets when asking for that backend), never hidden."""
from __future__ import annotations

import importlib

import torch

# Dtype codes shared with csrc/common/dtype.h (enum DType).
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _load(name: str):
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built for another Python
        return None, f"{name} could not be imported: {exc}"


cpu, cpu_error = _load("dlcore._C_cpu")
cuda, cuda_error = _load("dlcore._C_cuda")


def cpu_unavailable():
    """The `available` check of every cpu backend: None when the CPU extension loaded, else why not."""
    return cpu_error


def cuda_unavailable():
    """The `available` check of every cuda backend: None when the CUDA extension loaded and a device exists, else
    why not."""
    if cuda is None:
        return cuda_error
    return None if torch.cuda.is_available() else "no CUDA device"


_kernel_errors: dict[str, str] = {}


def triton_unavailable(module: str):
    """An `available` check for a triton backend: None when dlcore.kernels.<module> imports, else why not."""
    def check():
        if module not in _kernel_errors:
            try:
                importlib.import_module(f"dlcore.kernels.{module}")
                _kernel_errors[module] = ""
            except Exception as exc:  # triton missing or broken: report, don't fall back
                _kernel_errors[module] = f"triton kernels could not be imported: {exc}"
        return _kernel_errors[module] or None

    return check


def cuda_stream(device: torch.device) -> int:
    """The current torch stream on `device` as the integer the CUDA extension takes."""
    return torch.cuda.current_stream(device).cuda_stream
