"""The benchmark harness: timing, ratios, reports on disk, the case registry and the CLI's argument errors."""
import json
import subprocess
import sys

import pytest
import torch

import dlcore
from dlcore import bench
from dlcore.bench import harness, report
from dlcore.bench.shapes import resnet18_param_shapes


def test_resnet18_shapes_count():
    assert sum(torch.Size(s).numel() for s in resnet18_param_shapes()) == 11_689_512
    assert len(resnet18_param_shapes()) == 62


def test_adam_cases_name_their_baseline_and_targets():
    cases = bench.all_cases("cpu", ["adam"])
    assert all(c.baseline == "torch fused" for c in cases)
    assert {c.target for c in cases if c.quick} >= {0.95, 1.3}
    assert all(c.bytes > 0 for c in cases)
    with pytest.raises(ValueError, match="unknown op"):
        bench.all_cases("cpu", ["conv"])


def _tiny_case():
    def setup(n_sets):
        sets = [[torch.nn.Parameter(torch.randn(1000)) for _ in range(3)] for _ in range(n_sets)]
        for ps in sets:
            for p in ps:
                p.grad = torch.randn_like(p)
        ours = [dlcore.optim.Adam(ps) for ps in sets]
        theirs = [torch.optim.Adam(ps, foreach=False) for ps in sets]
        return {"dlcore": ours[0].step, "torch for-loop": theirs[0].step}

    return harness.Case("adam", "tiny", "cpu", setup, bytes=28 * 3000, baseline="torch for-loop", target=0.01)


def test_harness_times_every_variant_and_writes_reports(tmp_path, capsys):
    case = _tiny_case()
    peaks = {"bandwidth_GBps": 30.0, "bandwidth_kind": "test", "matmul_TFLOPs": 0.2, "matmul_kind": "test"}
    result = harness.run_case(case, quick=True, llc_bytes=1 << 20)
    assert not result.errors and set(result.times_ms) == {"dlcore", "torch for-loop"}
    assert result.speedup("torch for-loop") == pytest.approx(result.times_ms["torch for-loop"] / result.times_ms["dlcore"])
    info = harness.device_description("cpu")
    report.print_table([result], peaks, info)
    assert "tiny" in capsys.readouterr().out
    paths = report.write([result], peaks, info, {"versions": {}}, str(tmp_path))
    data = json.loads(open(paths["json"]).read())
    assert {r["variant"] for r in data["results"]} == {"dlcore", "torch for-loop"}
    assert data["targets"][0]["target"] == 0.01
    assert open(paths["md"]).read().startswith("# dlcore bench")
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"


def test_failed_setup_is_reported_not_raised():
    def broken(n_sets):
        raise RuntimeError("no such device")

    result = harness.run_case(harness.Case("adam", "broken", "cpu", broken), quick=True, llc_bytes=1 << 20)
    assert "no such device" in result.errors["setup"]


def test_variants_are_timed_in_rounds_and_a_failing_one_is_dropped():
    calls = []

    def failing_on_third_call():
        calls.append("b")
        if calls.count("b") == 3:
            raise ValueError("broke mid-run")

    fns = {"a": lambda: calls.append("a"), "b": failing_on_third_call, "c": lambda: calls.append("c")}
    times, errors = harness.time_interleaved(fns, "cpu", warmup=1, repeats=4)
    assert calls[:3] == ["a", "b", "c"]                      # warm-up, one variant after another
    assert calls[3:9] == ["a", "b", "c", "a", "b", "c"]      # then rounds: one call of each per round
    assert errors == {"b": "ValueError: broke mid-run"} and set(times) == {"a", "c"}
    assert len(times["a"]) == len(times["c"]) >= 4


def test_input_sets_cover_twice_the_cache():
    case = harness.Case("adam", "x", "cpu", lambda n: {}, bytes=1 << 20)
    assert harness.input_sets_needed(case, 8 << 20) == 8
    assert harness.input_sets_needed(harness.Case("adam", "x", "cpu", lambda n: {}, bytes=1 << 30), 8 << 20) == 1


def test_cli_report_is_written_after_every_case(tmp_path, monkeypatch):
    """A bench cut short (the GPU check's time limit) leaves the cases measured so far in its JSON report."""
    import argparse

    from dlcore import cli

    def interrupted(n_sets):
        raise KeyboardInterrupt  # what `timeout --signal=INT` delivers

    cases = [_tiny_case(), harness.Case("adam", "cut", "cpu", interrupted)]
    monkeypatch.setattr(bench, "all_cases", lambda device, ops, quick: cases)
    monkeypatch.setattr(harness, "measure_peaks", lambda device, quick=False: {
        "bandwidth_GBps": 30.0, "bandwidth_kind": "test", "matmul_TFLOPs": 0.2, "matmul_kind": "test"})
    args = argparse.Namespace(device="cpu", op=None, quick=True, out=str(tmp_path), strict=False)
    with pytest.raises(KeyboardInterrupt):
        cli._bench(args)
    (path,) = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["meta"]["partial"] == "1 of 2 cases" and {r["case"] for r in data["results"]} == {"tiny"}
    assert data["meta"]["allocator"] and "Host allocator:" in next(tmp_path.glob("*.md")).read_text()


def test_cli_rejects_unknown_op():
    proc = subprocess.run([sys.executable, "-m", "dlcore.cli", "bench", "--op", "conv"], capture_output=True,
                          text=True, timeout=300)
    # argparse's own error (exit 2, the valid ops listed), not a traceback
    assert proc.returncode == 2 and "invalid choice: 'conv'" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_order_from_per_backend_times_and_the_dispatch_reads_it(tmp_path, monkeypatch):
    case = harness.Case("adam", "x", "cuda", lambda n: {}, ops=("adam",))
    result = harness.Result(case, times_ms={"dlcore": 1.0, "dlcore[cuda]": 2.0, "dlcore[triton]": 1.0})
    assert report.gpu_order([result]) == {"adam": ["triton", "cuda"]}
    from dlcore import _dispatch

    order_file = tmp_path / "gpu_order.json"
    order_file.write_text(json.dumps({"some_new_op": ["triton", "cuda"]}))
    monkeypatch.setattr(_dispatch, "_MEASURED_ORDER_FILE", str(order_file))
    assert _dispatch.define_op("some_new_op").gpu_order == ("triton", "cuda")
    assert _dispatch.define_op("another_new_op").gpu_order == ("cuda", "triton")
    for name in ("some_new_op", "another_new_op"):
        _dispatch._OPS.pop(name)


def test_patch_cases_build_and_run_once():
    """The `patch` cases (models made of torch.nn modules, patched against unpatched): every variant runs."""
    cases = bench.all_cases("cpu", ["patch"])
    assert len(cases) == 4 and all(c.baseline == "torch eager" and c.target is None for c in cases)
    for case in cases:
        variants = case.setup(1)
        assert set(variants) == {"dlcore", "torch eager"}
        for fn in variants.values():
            fn()
