"""`dlcore info`: versions, devices, built extensions and the backends each op can use here."""
from __future__ import annotations

import importlib
import os
import platform

import torch

from dlcore import _dispatch, _ext


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # not installed: say so
        return f"not available ({type(exc).__name__})"


def collect() -> dict:
    import dlcore

    try:  # registers the replay-buffer ops with the dispatch point (it needs numba, which dlcore itself does not)
        import dlcore.rl  # noqa: F401
    except ImportError:
        pass

    from dlcore.bench.harness import device_description

    devices = [{"type": "cpu", "name": device_description("cpu")["name"], "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices.append({"type": "cuda", "index": i, "name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                            "capability": f"{prop.major}.{prop.minor}", "sms": prop.multi_processor_count})
    extensions = {
        "cpu": {"built": _ext.cpu is not None, "error": _ext.cpu_error,
                "simd": getattr(_ext.cpu, "simd", None), "omp_threads": _ext.cpu.max_threads() if _ext.cpu else None},
        "cuda": {"built": _ext.cuda is not None, "error": _ext.cuda_error,
                 "runtime": getattr(_ext.cuda, "cuda_runtime_version", None)},
    }
    return {
        "versions": {"dlcore": dlcore.__version__, "python": platform.python_version(), "torch": torch.__version__,
                     "triton": _version("triton"), "numba": _version("numba"), "pybind11": _version("pybind11")},
        "devices": devices,
        "extensions": extensions,
        "requested_backend": os.environ.get(_dispatch.ENV_VAR) or None,
        "backends": _dispatch.backend_table(),
    }


def info(print_out: bool = True) -> dict:
    """Print (and return) versions, devices, built extensions and the available backends per op."""
    data = collect()
    if print_out:
        lines = ["dlcore " + data["versions"]["dlcore"]]
        lines += [f"  {k:<9} {v}" for k, v in data["versions"].items() if k != "dlcore"]
        lines.append("devices")
        for d in data["devices"]:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in d.items()))
        lines.append("extensions")
        for name, e in data["extensions"].items():
            state = "built" if e["built"] else f"missing: {e['error']}"
            extra = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("built", "error") and v is not None)
            lines.append(f"  {name:<5} {state}" + (f" ({extra})" if extra else ""))
        if data["requested_backend"]:
            lines.append(f"DLCORE_BACKEND={data['requested_backend']}")
        lines.append("backends per op (yes, or why not)")
        for op, row in data["backends"].items():
            cells = ", ".join(f"{b}: {'yes' if r is None else r}" for b, r in row.items())
            lines.append(f"  {op:<16} {cells}")
        print("\n".join(lines))
    return data
