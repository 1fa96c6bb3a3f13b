"""pytest-benchmark suite over the same cases as `dlcore bench` (make bench-pytest):

    python -m pytest benchmarks/

Each case is one benchmark timing dlcore's variant; the peers of the case (stock eager, torch.compile), timed by
the shared harness in the same run, are attached as extra_info (<variant>_ms) next to it."""
import pytest
import torch

from dlcore import bench
from dlcore.bench import harness

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench.all_cases(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}:{c.name}" for c in CASES])
def test_case(benchmark, case):
    peers = harness.run_case(case, quick=True, llc_bytes=harness.last_level_cache_bytes(DEVICE))
    assert not peers.errors, peers.errors
    benchmark.group = f"{case.op}: {case.name}"
    benchmark.extra_info.update({f"{name}_ms": ms for name, ms in peers.times_ms.items()})
    benchmark.extra_info.update({f"speedup_vs_{name}": peers.speedup(name) for name in peers.times_ms
                                 if name != harness.DLCORE})
    dlcore_step = case.setup(1)[harness.DLCORE]
    benchmark.pedantic(lambda: (dlcore_step(), harness.synchronize(DEVICE)), rounds=10, warmup_rounds=2)
