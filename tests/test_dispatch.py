"""The dispatch point: default choice per device, use_backend / DLCORE_BACKEND overrides, clear errors, and
`dlcore info` (function and CLI)."""
import os
import subprocess
import sys

import pytest
import torch

import dlcore
from dlcore import _dispatch


def test_default_on_cpu_is_the_cpp_twin():
    name, _ = _dispatch.select("adam", torch.device("cpu"), torch.float32)
    assert name == ("cpu" if dlcore._ext.cpu is not None else "reference")


def test_default_falls_back_to_reference_for_dtypes_only_it_supports():
    assert _dispatch.select("adam", torch.device("cpu"), torch.float64)[0] == "reference"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_use_backend_forces_and_nests(backend):
    with dlcore.use_backend(backend):
        assert _dispatch.select("adam", torch.device("cpu"), torch.float32)[0] == backend
        with dlcore.use_backend("reference"):
            assert _dispatch.select("adam", torch.device("cpu"), torch.float32)[0] == "reference"
        assert _dispatch.select("adam", torch.device("cpu"), torch.float32)[0] == backend
        with dlcore.use_backend(None):
            assert _dispatch.requested_backend() is None or os.environ.get("DLCORE_BACKEND")


def test_env_var_is_honoured_and_checked(monkeypatch):
    monkeypatch.delenv("DLCORE_BACKEND", raising=False)
    default = _dispatch.select("adam", torch.device("cpu"), torch.float32)[0]  # cached: a change must still count
    monkeypatch.setenv("DLCORE_BACKEND", "reference")
    assert _dispatch.select("adam", torch.device("cpu"), torch.float32)[0] == "reference"
    assert _dispatch.select("adam", "cpu", torch.float32)[0] == "reference"  # a device given by name alike
    with dlcore.use_backend("cpu"):  # the context manager wins over the environment
        assert _dispatch.select("adam", torch.device("cpu"), torch.float32)[0] == "cpu"
    monkeypatch.setenv("DLCORE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="DLCORE_BACKEND='cudnn' is not a dlcore backend"):
        _dispatch.select("adam", torch.device("cpu"), torch.float32)
    monkeypatch.delenv("DLCORE_BACKEND")
    assert _dispatch.select("adam", torch.device("cpu"), torch.float32)[0] == default


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="not a dlcore backend"):
        with dlcore.use_backend("fast"):
            pass
    with pytest.raises(KeyError, match="no op 'conv'"):
        _dispatch.select("conv", torch.device("cpu"))


def test_unavailable_backend_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    with dlcore.use_backend("cuda"):
        with pytest.raises(dlcore.BackendUnavailableError, match="backend 'cuda' is not available here"):
            _dispatch.select("adam", torch.device("cpu"), torch.float32)


def test_info_function_and_cli(capsys):
    data = dlcore.info()
    out = capsys.readouterr().out
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["backends"]["adam"]) == set(_dispatch.BACKENDS)
    assert data["backends"]["adam"]["reference"] is None
    assert "adam" in out and "extensions" in out
    cli = subprocess.run([sys.executable, "-m", "dlcore.cli", "info"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "backends per op" in cli.stdout and "adam" in cli.stdout


def test_import_installs_no_top_level_kernels_or_models_module():
    import dlcore.kernels
    import dlcore.models

    assert dlcore.kernels.__name__ == "dlcore.kernels" and dlcore.models.__name__ == "dlcore.models"
    proc = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kernels'), "
                           "u.find_spec('models'))"], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.stdout.strip() == "None None", proc.stdout + proc.stderr


def test_cli_refuses_sizes_counts_and_periods_below_one(capsys):
    from dlcore import cli

    for argv, flag in ((["train", "gpt", "--steps", "0"], "--steps"), (["train", "dqn", "--eval-every", "0"],
                       "--eval-every"), (["profile", "alexnet", "--batch", "-2"], "--batch"),
                       (["train", "transformer", "--warmup", "0"], "--warmup"),
                       (["profile", "bert", "--length", "0"], "--length")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert f"argument {flag}: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (not an int at all: argparse's own message)
        cli.main(["train", "gpt", "--steps", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err
