"""Where `dlcore train` and `dlcore profile` find models: each module in dlcore.models registers its entry points
here when imported, so adding a model is adding one file.

    @register_trainer("dqn", help="...")
    def add_arguments(parser): ...          # the model's own command-line options
    def run(args) -> int: ...               # (given as `run=`)
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

KINDS = ("train", "profile")


@dataclass(frozen=True)
class Entry:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str, *, help: str, run: Callable[[argparse.Namespace], int]):
    """Decorator on a model's `add_arguments(parser)`: registers `name` under `dlcore <kind>`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def decorate(add_arguments):
        if name in _ENTRIES[kind]:
            raise ValueError(f"`dlcore {kind} {name}` is registered twice")
        _ENTRIES[kind][name] = Entry(name, help, add_arguments, run)
        return add_arguments

    return decorate


def entries(kind: str) -> dict[str, Entry]:
    """Every registered entry of `kind`, after importing every module of dlcore.models."""
    import dlcore.models

    for module in pkgutil.iter_modules(dlcore.models.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"dlcore.models.{module.name}")
    return dict(_ENTRIES[kind])
