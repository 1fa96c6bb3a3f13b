"""Root conftest: runs before any test module imports a kernel.

- Without a CUDA device, TRITON_INTERPRET=1 is set here, before triton is imported, so any kernel decorated
  with plain @triton.jit runs in the interpreter too (dlcore's own kernels pick compiled or interpreted per call).
- The interpreter's bf16 bugs (tl.dot on raw bits, truncating casts) are patched (kernels/_triton.py).
- Tests marked `gpu` are skipped, visibly, when there is no CUDA device.
- One random seed per session (DLCORE_TEST_SEED, shown in the header) feeds every test's inputs.
"""
import os
import time

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement of the test suite
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Fresh random inputs every run, one seed for the whole session, printed in the header: replay a failure with
# DLCORE_TEST_SEED=<seed> make test.
os.environ.setdefault("DLCORE_TEST_SEED", str(int(time.time() * 1000) % 2**31))  # keep triton 3.9's current default, without its warning

try:
    from dlcore.kernels._triton import patch_interpreter_bf16

    patch_interpreter_bf16()
except ImportError:  # triton missing: the triton backend reports itself unavailable
    pass


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import dlcore

    table = dlcore._dispatch.backend_table()
    return ["dlcore backends: " + "; ".join(
        f"{op}: " + ",".join(b for b, why in row.items() if why is None) for op, row in table.items()),
        f"CUDA device: {'yes' if HAS_CUDA else 'no (gpu tests skipped; Triton via the interpreter)'}",
        f"DLCORE_TEST_SEED={os.environ['DLCORE_TEST_SEED']}"]
