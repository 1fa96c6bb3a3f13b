"""Static GPU checks that need no GPU: every shipped Triton configuration compiles for sm_90 without register
spills and within Hopper's shared memory; the CUDA extension was built by nvcc (when nvcc is here) and its ptxas
report shows no spills."""
import importlib
import os
import shutil

import pytest

from dlcore import _ext, _static_check

triton = pytest.importorskip("triton")

CONFIGS = _static_check.shipped_builds()  # each configuration as the runtime may build it (see builds)


def test_every_kernel_module_ships_configs():
    assert {mod.__name__.rsplit(".", 1)[-1] for mod in _static_check.kernel_modules()} >= {"adam"}


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.label for c in CONFIGS])
def test_triton_config_compiles_for_sm90_without_spills(cfg):
    usage = _static_check.triton_usage(cfg, arch=90)
    assert usage.registers > 0
    assert not usage.problems, f"{cfg.label}: {usage.problems}"


RANDOM_AS_ONE = _static_check.random_keys_as_one()


def test_every_random_kernel_is_checked_with_its_keys_as_one():
    names = {c.kernel.__name__ for c in RANDOM_AS_ONE}
    assert {"sum_tree_sample_gather_kernel", "adam_kernel", "bias_gelu_forward_kernel"} <= names, names


@pytest.mark.parametrize("cfg", RANDOM_AS_ONE, ids=[c.label for c in RANDOM_AS_ONE])
def test_random_kernel_compiles_with_seed_one(cfg):
    """A seed or draw counter of 1 reaches the kernel as a constexpr (Triton's specialisation): it must compile."""
    assert not _static_check.triton_usage(cfg, arch=90).problems


def _nvcc():
    return os.environ.get("DLCORE_NVCC") or shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
def test_cuda_extension_was_built_when_nvcc_is_present():
    assert os.environ.get("DLCORE_BUILD_CUDA", "1") != "0", "DLCORE_BUILD_CUDA=0 switched the CUDA build off"
    assert _ext.cuda is not None, f"nvcc is at {_nvcc()} but the CUDA extension did not build: {_ext.cuda_error}"
    assert hasattr(_ext.cuda, "adam_step")


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine")
def test_cuda_kernels_do_not_spill():
    assert os.path.exists(_static_check.PTXAS_REPORT), "build the package: setup.py writes the ptxas report"
    rows = _static_check.cuda_usage()
    assert any("sm_90" in r.name for r in rows), "no sm_90 kernels in the ptxas report"
    bad = [(r.name, r.problems) for r in rows if r.problems]
    assert not bad, bad


def test_cuda_module_without_a_device_raises_not_crashes():
    if _ext.cuda is None:
        pytest.skip("CUDA extension not built")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a device is present")
    assert _ext.cuda.device_count() == 0
    with pytest.raises(RuntimeError, match="CUDA error"):
        _ext.cuda.adam_step(ptrs=0, numels=0, scal=0, chunks=0, n_chunks=1, chunk_size=1, param_dtype=0,
                            state_dtype=0, amsgrad=False, master=False, beta1=0.9, beta2=0.99,
                            one_minus_beta1=0.1, one_minus_beta2=0.01, weight_decay=0.0, decoupled=False,
                            maximize=False, seed=0, grad_scale_ptr=0, found_inf_ptr=0, stream=0)
    with pytest.raises(ValueError, match="dtype code"):
        importlib.import_module("dlcore._C_cpu").adam_step(
            ptrs=0, numels=0, scal=0, chunks=0, n_chunks=0, chunk_size=1, param_dtype=7, state_dtype=0,
            amsgrad=False, master=False, beta1=0.9, beta2=0.99, one_minus_beta1=0.1, one_minus_beta2=0.01,
            weight_decay=0.0, decoupled=False, maximize=False, seed=0, grad_scale_ptr=0, found_inf_ptr=0)
