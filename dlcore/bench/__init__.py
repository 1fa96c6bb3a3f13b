"""Benchmarks: `dlcore bench` and the pytest-benchmark suite in benchmarks/ run the same cases.

Each op contributes a module with `cases(device) -> list[Case]`; add it to CASE_MODULES."""
from __future__ import annotations

import importlib

from dlcore.bench.harness import DLCORE, Case, Result, run_case  # noqa: F401

CASE_MODULES = {"adam": "dlcore.bench.adam", "replay": "dlcore.bench.replay", "conv_relu": "dlcore.bench.conv_relu",
                "attention": "dlcore.bench.attention", "transformer": "dlcore.bench.transformer",
                "gpt": "dlcore.bench.gpt", "bert": "dlcore.bench.bert", "resnet": "dlcore.bench.resnet",
                "patch": "dlcore.bench.patching"}


def all_cases(device: str, ops=None, quick: bool = False) -> list[Case]:
    unknown = set(ops or ()) - set(CASE_MODULES)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; benchmarks exist for {sorted(CASE_MODULES)}")
    out = []
    for op, module in CASE_MODULES.items():
        if ops and op not in ops:
            continue
        out += [c for c in importlib.import_module(module).cases(device) if c.quick or not quick]
    return out
