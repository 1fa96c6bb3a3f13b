"""Static GPU check, no GPU needed: compile every shipped Triton configuration ahead of time for sm_90 and read
its resource usage from the cubin (cuobjdump), and read the CUDA extension's ptxas -v report written at build
time (setup.py). A register spill, a kernel over 255 registers or over Hopper's shared memory fails.

    python -m dlcore._static_check        # prints one row per kernel and exits non-zero on a violation
    python -m dlcore._static_check --search-attention [--fp32] [--head-dims 64,128]
                                          # proposes kernels/attention.py's tile tables (16-bit, or fp32 inputs)
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace

HOPPER_SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (opt-in maximum)
REGISTER_LIMIT = 255
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS_REPORT = os.path.join(REPO, "build", "cuda-ptxas-report.txt")


@dataclass
class KernelUsage:
    source: str           # "triton" or "cuda"
    name: str
    registers: int
    spill_bytes: int      # stack (Triton/cuobjdump) or spill stores + loads (ptxas)
    shared_bytes: int
    note: str = ""

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.registers > REGISTER_LIMIT:
            out.append(f"{self.registers} registers > {REGISTER_LIMIT}")
        if self.shared_bytes > HOPPER_SHARED_LIMIT:
            out.append(f"{self.shared_bytes} B shared > {HOPPER_SHARED_LIMIT}")
        return out


def cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if not path:
        raise RuntimeError("cuobjdump not found (neither in the triton wheel nor on PATH)")
    return path


def kernel_modules():
    """Every module of dlcore.kernels that ships AOT_CONFIGS."""
    import dlcore.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            mod = importlib.import_module(f"dlcore.kernels.{info.name}")
            if hasattr(mod, "AOT_CONFIGS"):
                yield mod


def builds(cfg):
    """The builds of one AOTConfig the runtime may make: Triton's launcher specialises each integer argument that
    is a multiple of 16 (strides and lengths of power-of-two shapes) and each 16-byte-aligned pointer (every fresh
    torch allocation), and compiles that code apart, with registers up to ~45 apart from the unspecialised build's
    (a batch-norm kernel spilled only so; aligned pointers took the sum-tree update from 80 to 174). Yields cfg
    (nothing specialised: offset views), then cfg with aligned pointers and every i32 argument a multiple of 16
    (a contiguous power-of-two shape: what the benchmarks run)."""
    yield cfg
    if cfg.divisible_ints or cfg.aligned_pointers:
        return
    ints = tuple(name for name, kind in cfg.signature.items() if kind == "i32")
    yield replace(cfg, divisible_ints=ints, aligned_pointers=True,
                  label=f"{cfg.label or cfg.kernel.__name__} [aligned{', ints %16' if ints else ''}]")


RANDOM_FLAGS = ("DROPOUT", "STOCHASTIC", "DRAW")  # constexprs that switch a kernel's Philox/hash path on
RANDOM_INTS = ("seed", "counter")  # its integer keys, any value a user may pass, 1 included


def random_keys_as_one():
    """One shipped config per kernel with a random path switched on, its seed/counter arguments compiled as the
    constexpr 1 the runtime turns them into when they equal 1 (Triton specialises integer arguments equal to 1;
    a constexpr has no .to(), so `seed.to(...)` compiles for every seed but 1)."""
    seen, out = set(), []
    for mod in kernel_modules():
        for cfg in mod.AOT_CONFIGS:
            keys = [n for n in RANDOM_INTS if cfg.signature.get(n) in ("i32", "i64")]
            if not keys or cfg.kernel.__name__ in seen or not any(cfg.constexprs.get(f) for f in RANDOM_FLAGS):
                continue
            seen.add(cfg.kernel.__name__)
            out.append(replace(cfg, signature={**cfg.signature, **{n: "constexpr" for n in keys}},
                               constexprs={**cfg.constexprs, **{n: 1 for n in keys}},
                               label=f"{cfg.label or cfg.kernel.__name__} [{'='.join(keys)}=1]"))
    return out


def shipped_builds():
    return [b for mod in kernel_modules() for cfg in mod.AOT_CONFIGS for b in builds(cfg)]


def compile_config(cfg, arch: int = 90):
    """Compile one AOTConfig for `arch`; returns triton's CompiledKernel (asm: ttir, ttgir, ptx, cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = cfg.kernel.compiled
    constexprs = {(fn.arg_names.index(k),): v for k, v in cfg.constexprs.items()}
    aligned = cfg.divisible_ints + tuple(k for k, kind in cfg.signature.items()
                                         if cfg.aligned_pointers and kind.startswith("*"))
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    src = ASTSource(fn, cfg.signature, constexprs, attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **cfg.options}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


_USAGE = re.compile(r"Function (\S+):\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")


def triton_usage(cfg, arch: int = 90) -> KernelUsage:
    compiled = compile_config(cfg, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"could not read cuobjdump's resource usage for {cfg.label}:\n{out}")
    # Triton's dynamic shared memory is not in the cubin's static SHARED: take the larger of the two.
    shared = max(int(m.group(4)), int(compiled.metadata.shared))
    ptx = compiled.asm.get("ptx", "")
    note = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "")
    return KernelUsage("triton", cfg.label or cfg.kernel.__name__, int(m.group(2)), int(m.group(3)), shared, note)


def cuda_usage(report_path: str = PTXAS_REPORT) -> list[KernelUsage]:
    """Parse the nvcc -Xptxas -v report of the last build (sm_90 entries)."""
    with open(report_path) as f:
        text = f.read()
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = KernelUsage("cuda", f"{m.group(1)} [{m.group(2)}]", 0, 0, 0)
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.spill_bytes = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            current.shared_bytes = int(m2.group(1)) if m2 else 0
    return rows


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def _fits(configs, max_registers: int):
    """(compiles everywhere without a spill, within max_registers, all wgmma, most registers) over every build of
    the configurations."""
    usages = [triton_usage(b) for cfg in configs for b in builds(cfg)]
    registers = max(u.registers for u in usages)
    return (not any(u.problems for u in usages), registers <= max_registers, all(u.note == "wgmma" for u in usages),
            registers)


def search_attention_tiles(fp32: bool = False, max_registers: int = 243, head_dims=(16, 32, 64, 128, 256)):
    """kernels/attention.py's GPU_TABLE (fp32: GPU_TABLE_FP32, every fp32 dot precision) as its comment states the
    rule: per kernel, head-dim class and heavy, the TILE_CANDIDATES entry of largest BM·BN whose builds() compile
    for sm_90 with no spill and at most max_registers (over max_registers only where nothing else compiles without
    a spill), wgmma over mma.sync, then the taller tile along the kernel's own axis (keys for dkdv, queries
    otherwise), then fewer registers. None where nothing fits. Then the split-key forward's table (SPLIT_TABLE /
    SPLIT_TABLE_FP32, heavy and not): the largest key block, then the fewest registers."""
    from dlcore.kernels import attention

    precisions = attention._precisions(fp32)
    table: dict = {}
    for kernel in attention.GPU_TABLE:
        table[kernel] = {}
        for bd in head_dims:
            for heavy in (False, True):
                ranked = []
                for bm, bn, warps in attention.TILE_CANDIDATES:
                    clean, roomy, wgmma, registers = _fits(
                        [attention.aot_config(kernel, bd, heavy, bm, bn, warps, p) for p in precisions], max_registers)
                    if clean:
                        ranked.append(((roomy, bm * bn, wgmma, bn if kernel == "dkdv" else bm, -registers),
                                       (bm, bn, warps)))
                table[kernel][(bd, heavy)] = max(ranked)[1] if ranked else None
                print(f"{kernel} d{bd}{' heavy' if heavy else ''}: {table[kernel][(bd, heavy)]}", flush=True)
    split = {}
    for bd in head_dims:
        ranked = []
        for bn in (64, 32, 16):
            for warps in (4, 8):
                clean, roomy, _, registers = _fits([attention._split_config(bd, heavy, bn, warps, p)
                                                    for heavy in (False, True) for p in precisions], 255)
                if clean:
                    ranked.append(((bn, -registers), (bn, warps)))
        split[bd] = max(ranked)[1] if ranked else None
        print(f"split d{bd}: {split[bd]}", flush=True)
    return table, split


def main() -> int:
    if "--search-attention" in sys.argv[1:]:  # [--fp32] [--head-dims 64,128]: fp32 inputs; those classes only
        from dlcore.kernels import attention

        args = sys.argv[1:]
        dims = tuple(int(d) for d in args[args.index("--head-dims") + 1].split(",")) if "--head-dims" in args \
            else (16, 32, 64, 128, 256)
        fp32 = "--fp32" in args
        table, split = search_attention_tiles(fp32=fp32, head_dims=dims)
        names = ("GPU_TABLE_FP32", "SPLIT_TABLE_FP32") if fp32 else ("GPU_TABLE", "SPLIT_TABLE")
        print(f"{names[0]} =", table)
        print(f"{names[1]} =", split)
        shipped = {k: {key: t for key, t in v.items() if key[0] in dims}
                   for k, v in getattr(attention, names[0]).items()}
        shipped_split = {bd: t for bd, t in getattr(attention, names[1]).items() if bd in dims}
        print("same as shipped" if (table, split) == (shipped, shipped_split) else "DIFFERS from what ships")
        return 0
    rows = [triton_usage(cfg) for cfg in shipped_builds()]
    if os.path.exists(PTXAS_REPORT):
        rows += cuda_usage()
    else:
        print(f"(no CUDA build report at {PTXAS_REPORT})")
    bad = 0
    for r in rows:
        problems = r.problems
        bad += bool(problems)
        print(f"{r.source:<6} REG {r.registers:>3}  spill {r.spill_bytes:>5} B  shared {r.shared_bytes:>6} B  "
              f"{'FAIL: ' + '; '.join(problems) if problems else 'ok'}  {r.name} {r.note}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
