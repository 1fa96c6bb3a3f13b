"""The one dispatch point: (op, device, dtype, requested backend) → one launcher.

Backends: ``cuda`` (CUDA C++ via dlcore._C_cuda), ``triton`` (kernels/, compiled on a GPU, Triton's interpreter on
CPU tensors), ``cpu`` (C++ twin via dlcore._C_cpu), ``numba`` (@njit CPU kernels, where an op has them: the replay
sum-tree), ``reference`` (plain PyTorch beside the op).

Which one runs:
1. ``dlcore.use_backend(name)`` (innermost wins), else the ``DLCORE_BACKEND`` environment variable;
2. otherwise the default: on CUDA tensors the op's measured-fastest GPU backend (``gpu_order``), on CPU tensors the
   C++ twin, then numba; the first of those that is available for the device and dtype, then ``reference``.

An explicitly requested backend that cannot run the call is an error (BackendUnavailableError) naming why, never
a silent fallback. Every backend of an op has the same launcher signature.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

BACKENDS = ("cuda", "triton", "cpu", "numba", "reference")
CPU_ORDER = ("cpu", "numba")
ENV_VAR = "DLCORE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run this call (not built, wrong device or dtype)."""


@dataclass
class Impl:
    fn: Callable
    devices: frozenset
    dtypes: frozenset
    available: Callable[[], Optional[str]]  # None when usable, else the reason it is not

    def why_not(self, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
        reason = self.available()
        if reason:
            return reason
        if device_type not in self.devices:
            return f"runs on {sorted(self.devices)} tensors, not {device_type}"
        if dtype is not None and dtype not in self.dtypes:
            return f"supports {sorted(str(d) for d in self.dtypes)}, not {dtype}"
        return None


@dataclass
class Op:
    name: str
    gpu_order: tuple = ("cuda", "triton")  # fastest measured first; see benchmarks/results
    impls: dict = field(default_factory=dict)


_OPS: dict[str, Op] = {}
_requested: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("dlcore_backend", default=None)


def _always() -> Optional[str]:
    return None


_MEASURED_ORDER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_order.json")


def _measured_gpu_order() -> dict:
    """dlcore/gpu_order.json: {op: [backend, ...]} fastest first, from `dlcore bench --device cuda` ("gpu_order"
    in its JSON report), committed after a GPU run. Absent until one has been measured."""
    try:
        with open(_MEASURED_ORDER_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def define_op(name: str, gpu_order: Iterable[str] = ("cuda", "triton")) -> Op:
    """Declare an op; its GPU preference is the measured one when dlcore/gpu_order.json names it."""
    op = _OPS.setdefault(name, Op(name))
    op.gpu_order = tuple(_measured_gpu_order().get(name, gpu_order))
    _SELECTED.clear()
    return op


def register(op: str, backend: str, *, devices: Iterable[str], dtypes: Iterable[torch.dtype],
             available: Callable[[], Optional[str]] = _always):
    """Decorator: register `fn` as `backend`'s launcher for `op`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn):
        _OPS.setdefault(op, Op(op)).impls[backend] = Impl(fn, frozenset(devices), frozenset(dtypes), available)
        _SELECTED.clear()
        return fn

    return deco


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a dlcore backend; expected one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> Optional[str]:
    """The backend forced by use_backend() or DLCORE_BACKEND, or None for the default choice."""
    name = _requested.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, ENV_VAR) if env else None


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Run every dlcore op inside the block on backend `name` (None restores the default choice).

    >>> with dlcore.use_backend("reference"):
    ...     opt.step()
    """
    token = _requested.set(None if name is None else _check_name(name, "use_backend"))
    try:
        yield
    finally:
        _requested.reset(token)


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"dlcore has no op {name!r}; known ops: {sorted(_OPS)}") from None


# (op, device, dtype, use_backend name, DLCORE_BACKEND) -> (backend, launcher): a successful choice is reused,
# since the ops with microsecond targets (replay sampling) cannot pay for the search on every call. Failures are
# not cached, so their errors are raised afresh; define_op/register clear it.
_SELECTED: dict[tuple, tuple[str, Callable]] = {}


def _environment_value() -> Optional[object]:
    """DLCORE_BACKEND as stored in os.environ (raw), for the cache key only: os.environ.get costs ~1 µs on the
    slow VMs (it encodes the key and decodes the value), CPython's underlying dict lookup ~0.03 µs. Both see what
    os.environ[...] = / del / monkeypatch.setenv change, and neither sees a bare os.putenv."""
    return _ENVIRON_DATA.get(_ENVIRON_KEY) if _ENVIRON_DATA is not None else os.environ.get(ENV_VAR)


try:  # os._Environ internals (CPython, every platform); anything else takes the public call
    _ENVIRON_DATA, _ENVIRON_KEY = os.environ._data, os.environ.encodekey(ENV_VAR)
except AttributeError:  # pragma: no cover
    _ENVIRON_DATA, _ENVIRON_KEY = None, None


def select(op_name: str, device: "torch.device | str", dtype: Optional[torch.dtype] = None) -> tuple[str, Callable]:
    """Return (backend name, launcher) for a call of `op_name` on tensors of `device` and `dtype`."""
    # keyed by the device object itself (hashing it is ~0.03 µs; reading torch.device.type ~0.5 µs)
    key = (op_name, device, dtype, _requested.get(), _environment_value())
    choice = _SELECTED.get(key)
    if choice is None:
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        choice = _SELECTED[key] = _select(op_name, device_type, dtype)
    return choice


def _select(op_name: str, device_type: str, dtype: Optional[torch.dtype]) -> tuple[str, Callable]:
    op = get_op(op_name)
    wanted = requested_backend()
    if wanted is not None:
        impl = op.impls.get(wanted)
        if impl is None:
            raise BackendUnavailableError(f"dlcore op {op_name!r} has no {wanted!r} backend "
                                          f"(it has: {', '.join(sorted(op.impls))})")
        reason = impl.why_not(device_type, dtype)
        if reason:
            raise BackendUnavailableError(f"dlcore op {op_name!r}: backend {wanted!r} is not available here: {reason}")
        return wanted, impl.fn
    order = op.gpu_order if device_type == "cuda" else CPU_ORDER
    for name in (*order, "reference"):
        impl = op.impls.get(name)
        if impl is not None and impl.why_not(device_type, dtype) is None:
            return name, impl.fn
    raise BackendUnavailableError(f"dlcore op {op_name!r}: no backend can run on {device_type} with dtype {dtype}")


def select_within(op_name: str, t: torch.Tensor, triton_limit: int) -> Callable:
    """select()'s launcher for tensor t [rows, cols], except that when the default choice is triton and cols exceeds
    the Triton kernel's limit the reference runs instead; triton asked for by name still runs (and its own error
    says why)."""
    backend, launch = select(op_name, t.device, t.dtype)
    if backend == "triton" and t.shape[1] > triton_limit and requested_backend() is None:
        return get_op(op_name).impls["reference"].fn
    return launch


def backend_table() -> dict[str, dict[str, Optional[str]]]:
    """For each op and backend: None if it can run on this machine's devices, else the reason it cannot."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for name, op in sorted(_OPS.items()):
        row = {}
        for backend in BACKENDS:
            impl = op.impls.get(backend)
            if impl is None:
                row[backend] = "not implemented"
                continue
            reasons = [impl.why_not(d, None) for d in devices]
            row[backend] = None if any(r is None for r in reasons) else reasons[-1]
        table[name] = row
    return table
