"""Build dlcore: a CPU extension (pybind11, OpenMP, -O3, vectorised for this machine) always, and a CUDA
extension built by nvcc whenever nvcc is found.

Neither extension includes a torch header: they take raw pointers, sizes and a stream as integers, so torch is
not a build requirement and the modules survive torch upgrades.

Environment overrides
  DLCORE_BUILD_CUDA=0|1     force the CUDA extension off / on (on fails the build when nvcc is missing)
  DLCORE_CUDA_ARCHS="80;90" SM architectures (PTX of the highest is embedded too)
  DLCORE_NATIVE=0           build the CPU extension without -march=native (portable wheels)
  DLCORE_NVCC=/path/nvcc    which nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)
  MAX_JOBS=N                parallel compile jobs (default: number of CPUs)
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import Extension, setup
import pybind11

HERE = os.path.dirname(os.path.abspath(__file__))
PTXAS_REPORT = os.path.join(HERE, "build", "cuda-ptxas-report.txt")
JOBS = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
ParallelCompile("MAX_JOBS", default=JOBS).install()


def _find_nvcc():
    explicit = os.environ.get("DLCORE_NVCC")
    if explicit:
        return explicit
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _want_cuda(nvcc):
    flag = os.environ.get("DLCORE_BUILD_CUDA")
    if flag is None:
        return nvcc is not None
    if flag.strip() in ("0", "false", "no", "off", ""):
        return False
    if nvcc is None:
        raise RuntimeError("DLCORE_BUILD_CUDA=1 but no nvcc was found (set DLCORE_NVCC or CUDA_HOME)")
    return True


class CUDAExtension(Extension):
    """An extension compiled and linked entirely by nvcc (cudart linked statically, so the module imports on a
    machine without a GPU and raises a Python error only when called)."""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, CUDAExtension):
            return self._build_cuda(ext)
        return super().build_extension(ext)

    def _build_cuda(self, ext):
        nvcc = _find_nvcc()
        archs = [a.strip() for a in os.environ.get("DLCORE_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], os.path.join(HERE, "csrc")]
        common = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC,-fvisibility=hidden",
                  "--threads", "0", "-Xptxas", "-v"] + gencode + [f"-I{i}" for i in includes]
        build_temp = os.path.join(self.build_temp, "cuda")
        os.makedirs(build_temp, exist_ok=True)
        objects = [os.path.join(build_temp, os.path.basename(s) + ".o") for s in ext.sources]

        def compile_one(src_obj):
            src, obj = src_obj
            cmd = [nvcc, "-c", src, "-o", obj] + common
            print(" ".join(cmd), flush=True)
            run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if run.returncode != 0:
                print(run.stdout, file=sys.stderr)
                raise subprocess.CalledProcessError(run.returncode, cmd)
            return f"== {src}\n{run.stdout}"

        with ThreadPoolExecutor(max_workers=max(1, JOBS)) as pool:
            reports = list(pool.map(compile_one, zip(ext.sources, objects)))
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # ptxas -v resource usage (registers, spills, shared memory) of every kernel, read by the static GPU check
        # (dlcore/_static_check.py), which fails the tests on a spill.
        os.makedirs(os.path.join(HERE, "build"), exist_ok=True)
        with open(PTXAS_REPORT, "w") as f:
            f.write("".join(reports))
        cmd = [nvcc, "-shared", "-o", out, *objects, "-cudart", "static"] + gencode
        print(" ".join(cmd), flush=True)
        subprocess.check_call(cmd)


def _cpu_flags():
    # -fno-trapping-math lets GCC turn the conversions' selects into vector blends (with trapping math it keeps
    # them as branches and the fp16 loops do not vectorise); dlcore never reads floating-point exception flags.
    flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("DLCORE_NATIVE", "1") != "0":
        # znver1-style tuning (what -march=native reports on these VMs) prefers 128-bit vectors; the fused
        # optimizer loops are compute-heavy enough (stochastic rounding hashes) that 256-bit halves their time.
        flags += ["-march=native", "-mprefer-vector-width=256"]
    return flags


ext_modules = [
    Pybind11Extension(
        "dlcore._C_cpu",
        sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join(HERE, "csrc", "cpu")) if f.endswith(".cpp")),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=_cpu_flags(),
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )
]
if _want_cuda(_find_nvcc()):
    ext_modules.append(
        CUDAExtension(
            "dlcore._C_cuda",
            sorted(os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join(HERE, "csrc", "cuda")) if f.endswith(".cu")),
        )
    )

setup(
    name="dlcore",
    version="0.1.0",
    description="Hand-written GPU kernels (Triton, CUDA C++) with fast CPU twins for the milestone models of deep learning",
    python_requires=">=3.11",
    # One import name: the top-level kernels/ and models/ folders are installed as dlcore.kernels and
    # dlcore.models, so no top-level `kernels` or `models` module lands in site-packages.
    packages=["dlcore", "dlcore.optim", "dlcore.ops", "dlcore.bench", "dlcore.rl", "dlcore.kernels", "dlcore.models"],
    package_dir={"dlcore": "dlcore", "dlcore.kernels": "kernels", "dlcore.models": "models"},
    package_data={"dlcore.models": ["data/*.txt", "data/*.md"]},  # the training text of `dlcore train gpt`
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    install_requires=["numpy"],  # torch, triton and numba are the user's choice of build; see README
    extras_require={"bench": ["rich", "matplotlib"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["dlcore=dlcore.cli:main"]},
    zip_safe=False,
)
