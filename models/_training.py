"""What the training entry points share: a progress bar, dataclass-driven command-line options, a loss plot."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, fields
from typing import Optional


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


def add_dataclass_arguments(parser: argparse.ArgumentParser, defaults) -> None:
    """One --flag per field of the dataclass instance `defaults` (bools as --x/--no-x, tuples as lists)."""
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, (tuple, list)):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        elif value is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(value), default=value)


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
