"""What the training entry points share: a progress bar, dataclass-driven command-line options, a loss plot."""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
from dataclasses import asdict, fields
from typing import Optional

import torch


class Progress:
    """A rich progress bar over training steps (plain prints when rich is missing or the bar is disabled)."""

    def __init__(self, label: str, enabled: bool, total: int, start: int = 0):
        self._bar = None
        if enabled:
            try:
                from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

                self._bar = RichProgress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                         TimeRemainingColumn(), TextColumn("{task.description}"))
                self._bar.start()
                self._task = self._bar.add_task("", total=total, completed=start)
            except ImportError:
                self._bar = None

    def advance(self, completed: int, text: Optional[str] = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, **({"description": text} if text else {}))

    def note(self, text: str) -> None:
        (self._bar.console.print if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# Integer options are sizes, counts and periods (`step % eval_every`, `(s + 1) / warmup`): argparse refuses one
# below 1, naming the flag, instead of a ZeroDivisionError or an empty history deep in a run. These few may be 0,
# and a seed may be anything.
ZERO_ALLOWED = frozenset({"learning_starts", "pretrain_steps", "solve_episodes", "top"})  # (solve_episodes 0: no goal)
ANY_INT = frozenset({"seed"})


def int_at_least(lowest: int):
    """An argparse `type`: an int ≥ lowest (argparse then reports "argument --x: must be ≥ …, got …")."""
    def parse(text: str) -> int:
        value = int(text)
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    parse.__name__ = "int"  # (argparse names the type in its "invalid int value" message)
    return parse


def int_option(name: str):
    return int if name in ANY_INT else int_at_least(0 if name in ZERO_ALLOWED else 1)


def add_dataclass_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """One --flag per field of the dataclass instance `defaults` (bools as --x/--no-x, tuples as lists)."""
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, (tuple, list)):
            parser.add_argument(flag, type=int_option(name), nargs="+", default=list(value))
        elif value is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=int_option(name) if isinstance(value, int) else type(value),
                                default=value)


def add_profile_arguments(parser: argparse.ArgumentParser, batch: int, compile_option: bool = True) -> None:
    """The options every `dlcore profile <model>` takes (its model-specific ones are added beside them)."""
    parser.add_argument("--batch", type=int_option("batch"), default=batch)
    parser.add_argument("--steps", type=int_option("steps"), default=3,
                        help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast")
    if compile_option:
        parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd stock twin")
    parser.add_argument("--device", choices=["cpu", "cuda"])


def dataclass_arguments(config_cls):
    """`add_arguments` for registry.register: one --flag per field of the dataclass config_cls (its defaults)."""
    def add(parser: argparse.ArgumentParser) -> None:
        add_dataclass_arguments(parser, config_cls())
    return add


def write_summary(out: str, summary: dict) -> None:
    """out/summary.json (values JSON cannot hold are written as their str)."""
    import json

    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)


def dataclass_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(args).items() if k in names})


def plot_curves(path: str, curves: dict, xlabel: str, ylabel: str, title: str) -> bool:
    """curves: {label: (xs, ys)} → a PNG at `path`; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, lw=1)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class _PeakMemory:
    """Peak memory allocated during the block above what was allocated at its start: CUDA's allocator statistics
    on a GPU; on the CPU torch's profiler with memory tracking, replaying each op's own allocations and frees in
    start order (a transient inside one op that it frees itself is not seen; allocations by the C++ kernels' own
    scratch buffers, a few KB per thread, are not tensors and not counted)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(*exc)
        current = 0
        for event in sorted(self._prof.events(), key=lambda e: e.time_range.start):
            current += event.self_cpu_memory_usage
            self.peak = max(self.peak, current)


def time_variants(fns: dict, device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds per call of each variant: two warm-up calls each, then `steps` rounds of one call per variant
    (dlcore.bench.harness.time_interleaved: a noisy minute on a shared machine falls on every variant alike).
    Raises if a variant fails."""
    from dlcore.bench.harness import time_interleaved

    times, errors = time_interleaved(fns, str(device), warmup=2, repeats=steps)
    if errors:
        raise RuntimeError("; ".join(f"{name}: {error}" for name, error in errors.items()))
    return {name: statistics.median(t) for name, t in times.items()}


EAGER_INFERENCE = "torch eager inference"


def profile_inference(models: dict, x: torch.Tensor, batch: int, device: torch.device, steps: int,
                      autocast: bool = False) -> list[dict]:
    """Inference rows for print_profile: each model (in eval mode, no_grad, under bf16 autocast when asked) on x,
    in interleaved rounds (time_variants); `models` must hold EAGER_INFERENCE, the stock twin, which the
    speed-ups are read against. Peak memory is not measured (NaN)."""
    def run(model):
        @torch.no_grad()
        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                model(x)
        return call

    medians = time_variants({name: run(model) for name, model in models.items()}, device, steps)
    eager = medians[EAGER_INFERENCE]
    return [{"variant": name, "step_s": seconds, "tokens_per_s": batch / seconds, "peak_mib": float("nan"),
             "speedup_vs_eager": eager / seconds} for name, seconds in medians.items()]


FUSED_STOCK = "torch eager + fused AdamW"


def profile_training(ours: torch.nn.Module, twin: torch.nn.Module, inputs: tuple, tokens: int, device: torch.device,
                     steps: int = 3, autocast: bool = False, compile_stock: bool = False) -> list[dict]:
    """Time a training step (model(*inputs) → loss, backward, AdamW step) of the dlcore model with dlcore's AdamW
    and of its stock twin with torch's, default and fused=True (and of the torch.compile'd twin): two warm-up
    steps each, then `steps` rounds of one step per variant (interleaved, as `dlcore bench` times: on a shared
    machine a noisy minute then falls on every variant; one after another, a Seq2Seq profile read 0.90× and 1.35×
    on the same code), median; then one step of each under _PeakMemory. Rows: variant, step_s, tokens_per_s,
    peak_mib, speedup_vs_eager."""
    import dlcore.optim

    runs = [("dlcore", ours, dlcore.optim.AdamW(ours.parameters(), lr=1e-4)),
            ("torch eager", twin, torch.optim.AdamW(twin.parameters(), lr=1e-4))]
    # the stock twin with torch's own fused AdamW as well (torch.optim's default is foreach): how much of the
    # speed-up is the layers and how much the optimizer (AlexNet B16 on the CPU: most of it was the optimizer)
    fused_twin = copy.deepcopy(twin)
    try:
        runs.append((FUSED_STOCK, fused_twin, torch.optim.AdamW(fused_twin.parameters(), lr=1e-4, fused=True)))
    except (RuntimeError, ValueError):  # a device or dtype torch's fused AdamW does not take
        pass
    if compile_stock:
        other = copy.deepcopy(twin)
        runs.append(("torch.compile", torch.compile(other), torch.optim.AdamW(other.parameters(), lr=1e-4)))

    def make_step(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(*inputs)
            loss.backward()
            opt.step()
        return step

    step_fns = {name: make_step(model, opt) for name, model, opt in runs}
    medians = time_variants(step_fns, device, steps)
    rows = []
    for name, _, opt in runs:
        opt.zero_grad(set_to_none=True)
        with _PeakMemory(device) as mem:
            step_fns[name]()
        seconds = medians[name]
        rows.append({"variant": name, "step_s": seconds, "tokens_per_s": tokens / seconds,
                     "peak_mib": mem.peak / 2 ** 20})
    eager = next(r["step_s"] for r in rows if r["variant"] == "torch eager")
    for r in rows:
        r["speedup_vs_eager"] = eager / r["step_s"]
    return rows


def print_profile(title: str, rows: list[dict]) -> None:
    print(title)
    width = max(15, *(len(r["variant"]) + 1 for r in rows))
    print(f"{'variant':<{width}}{'step s':>9}{'tokens/s':>11}{'peak MiB':>10}{'vs eager':>10}")
    for r in rows:
        print(f"{r['variant']:<{width}}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}{r['peak_mib']:>10.0f}"
              f"{r['speedup_vs_eager']:>9.2f}×")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1):
    """Linear warm-up over the first warmup_fraction of total_steps, then cosine decay to 0: a LambdaLR whose
    saved state is only the step, so a run resumed with a longer schedule follows the new one."""
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
