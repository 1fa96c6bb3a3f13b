"""The benchmark harness behind `dlcore bench` and benchmarks/ (pytest-benchmark).

A Case names an op, a shape and a device, and builds its variants: dlcore's implementation and its peers (stock
PyTorch eager, torch.compile of the stock code). All variants of a case are timed in the same run: warm-up,
device synchronisation, median of repeats taken in rounds (one call of each variant per round, so load from
elsewhere on a shared machine falls on every variant alike), and enough independent input sets, used in rotation, that the
working set exceeds the last-level cache (so caches do not flatter whoever runs second). Each case states the
bytes it must move and the FLOPs it must do, so results read as GB/s or TFLOP/s and as a percentage of the
device's peak, measured at start-up in the same run.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch._dynamo

DLCORE = "dlcore"

# Each case compiles its own closure of the same function (bench/conv_relu.py's `chain`, …): dynamo keys its cache
# by code object, and past its recompile limit (8) it silently runs the function eagerly, so the later cases'
# "torch.compile" variant measured eager. Room for every case of a run:
for _limit in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, max(64, getattr(torch._dynamo.config, _limit)))


@dataclass
class Case:
    op: str
    name: str
    device: str
    # setup(n_sets) -> {variant name: zero-argument callable}; "dlcore" must be one of them. Each callable uses
    # its own n_sets input sets in rotation.
    setup: Callable[[int], dict[str, Callable[[], object]]]
    bytes: float = 0.0               # bytes that must cross memory per call (reads + writes)
    flops: float = 0.0
    baseline: str = ""               # the peer an issue's target refers to
    target: Optional[float] = None   # speed-up over `baseline` the issue asks for
    bandwidth_target: Optional[float] = None  # fraction of peak bandwidth the issue asks for
    max_ms: Optional[float] = None   # absolute time the issue asks dlcore to stay under (device-specific)
    ops: tuple = ()                  # dispatch ops the dlcore variant runs: on a GPU each backend is timed too
    quick: bool = True               # part of --quick
    notes: str = ""


@dataclass
class Result:
    case: Case
    times_ms: dict[str, float] = field(default_factory=dict)   # median per variant
    spread: dict[str, float] = field(default_factory=dict)     # (p75 - p25) / median per variant
    errors: dict[str, str] = field(default_factory=dict)

    def speedup(self, peer: str) -> Optional[float]:
        if DLCORE not in self.times_ms or peer not in self.times_ms:
            return None
        return self.times_ms[peer] / self.times_ms[DLCORE]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_call(fn: Callable[[], object], device: str) -> float:
    """Seconds for one call: CUDA events on a GPU, the host clock on the CPU."""
    if device.startswith("cuda"):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_callable(fn: Callable[[], object], device: str, warmup: int, repeats: int,
                  min_seconds: float = 0.0) -> list[float]:
    """Seconds per call: `warmup` untimed calls, then at least `repeats` calls (more until `min_seconds`)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_seconds and len(times) < 10 * repeats):
        times.append(_timed_call(fn, device))
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int,
                     min_seconds: float = 0.0, progress: Optional[Callable[[str], None]] = None
                     ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of every variant, timed in rounds: one call of each variant per round, so a burst of
    load from elsewhere on the machine lands on all of them alike (timing one variant's repeats after another's
    let a noisy minute decide a ratio: 0.81x and 0.99x in two runs of the same case on a shared VM). At least
    `repeats` rounds, more until `min_seconds` per variant. Returns (times, errors); a variant that raises is
    dropped with its error."""
    times: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    live = {}
    for name, fn in fns.items():  # warm-up (and compilation) one variant at a time
        if progress:
            progress(name)
        try:
            for _ in range(warmup):
                fn()
            synchronize(device)
        except Exception as exc:
            errors[name] = _error_line(exc)
            continue
        live[name], times[name] = fn, []
    start = time.perf_counter()
    rounds = 0
    while live and (rounds < repeats or (time.perf_counter() - start < min_seconds * len(live)
                                         and rounds < 10 * repeats)):
        for name in list(live):
            try:
                times[name].append(_timed_call(live[name], device))
            except Exception as exc:
                errors[name] = _error_line(exc)
                del live[name], times[name]
        rounds += 1
    return times, errors


def _error_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def last_level_cache_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))
    best = 32 * 2**20
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()  # e.g. "32768K"
            if text and text[-1] in "KM":
                best = max(best, int(text[:-1]) * (2**10 if text[-1] == "K" else 2**20))
    except (OSError, ValueError):
        pass
    return best


def input_sets_needed(case: Case, llc_bytes: int) -> int:
    """Input sets to rotate through so one pass over them is at least twice the last-level cache."""
    if case.bytes <= 0:
        return 2
    return max(1, min(8, math.ceil(2 * llc_bytes / case.bytes)))


def measure_peaks(device: str, quick: bool = False) -> dict:
    """Peak memory bandwidth (a read-modify-write kernel on the CPU, as our kernels are; a copy on a GPU) and
    peak matmul throughput, measured now on this device."""
    warmup, repeats = (2, 5) if quick else (3, 10)
    if device.startswith("cuda"):
        n = (1 << 28) if not quick else (1 << 27)  # 1 GiB / 512 MiB of fp32
        x = torch.empty(n, device=device)
        y = torch.empty_like(x)
        bw_time = statistics.median(time_callable(lambda: y.copy_(x), device, warmup, repeats))
        bandwidth = 2 * x.numel() * 4 / bw_time
        x = y = None  # free the buffers before the matmul
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        mm_time = statistics.median(time_callable(lambda: a @ b, device, warmup, repeats))
        return {"bandwidth_GBps": bandwidth / 1e9, "bandwidth_kind": "device copy (read + write)",
                "matmul_TFLOPs": 2 * m**3 / mm_time / 1e12, "matmul_kind": f"bf16 {m}^3"}
    n = (1 << 26) if not quick else (1 << 25)  # 256 / 128 MiB of fp32
    x, y = torch.ones(n), torch.ones(n)
    # The best of two streaming kernels (bytes read + written): in-place x *= c (read-modify-write, as the
    # optimizers do) and y = x; a single one varies ±15 % run to run on a shared VM.
    bandwidth = max(2 * n * 4 / statistics.median(time_callable(fn, device, warmup, repeats))
                    for fn in (lambda: x.mul_(1.0000001), lambda: y.copy_(x)))
    x = y = None
    m = 2048 if not quick else 1024
    a, b = torch.randn(m, m), torch.randn(m, m)
    mm_time = statistics.median(time_callable(lambda: a @ b, device, warmup, repeats))
    return {"bandwidth_GBps": bandwidth / 1e9, "bandwidth_kind": "best of x *= c and y = x (read + write)",
            "matmul_TFLOPs": 2 * m**3 / mm_time / 1e12, "matmul_kind": f"fp32 {m}^3"}


def device_description(device: str) -> dict:
    if device.startswith("cuda"):
        prop = torch.cuda.get_device_properties(0)
        return {"device": device, "name": prop.name, "sms": prop.multi_processor_count,
                "memory_GiB": round(prop.total_memory / 2**30, 1)}
    name = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"device": "cpu", "name": name, "threads": torch.get_num_threads()}


def backend_variants(case: Case, dlcore_fn) -> dict[str, Callable[[], object]]:
    """On a GPU, dlcore's variant once per GPU backend that can run every op of the case ("dlcore[triton]", ...):
    the measurements behind each op's gpu_order (report.gpu_order)."""
    from dlcore import _dispatch

    if dlcore_fn is None or not case.device.startswith("cuda") or not case.ops:
        return {}
    out = {}
    for backend in ("cuda", "triton"):
        impls = [_dispatch.get_op(op).impls.get(backend) for op in case.ops]
        if all(impl is not None and impl.available() is None for impl in impls):
            def run(fn=dlcore_fn, name=backend):
                with _dispatch.use_backend(name):
                    return fn()

            out[f"{DLCORE}[{backend}]"] = run
    return out


def run_case(case: Case, quick: bool, llc_bytes: int, progress: Optional[Callable[[str], None]] = None) -> Result:
    result = Result(case)
    warmup, repeats, min_seconds = (2, 7, 0.3) if quick else (3, 15, 1.0)
    try:
        variants = case.setup(input_sets_needed(case, llc_bytes))
    except Exception as exc:  # a case that cannot be set up here is reported, not hidden
        result.errors["setup"] = f"{type(exc).__name__}: {exc}"
        return result
    variants.update(backend_variants(case, variants.get(DLCORE)))
    all_times, errors = time_interleaved(
        variants, case.device, warmup, repeats, min_seconds,
        progress=(lambda name: progress(f"{case.op}: {case.name} — {name}")) if progress else None)
    result.errors.update(errors)
    for name, times in all_times.items():
        times = sorted(times)
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 4 else [med, med, med]
        result.times_ms[name] = med * 1e3
        result.spread[name] = (q[2] - q[0]) / med if med else 0.0
    del variants
    if case.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result
