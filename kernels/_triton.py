"""One Triton function, two ways to run it: compiled (`triton.jit`) for CUDA tensors and through Triton's
interpreter for CPU tensors, chosen per call from the tensors' device rather than from TRITON_INTERPRET at import
time. Device functions shared between kernels are marked `@dual_helper`: each way of running a kernel sees its own
build of them (a JITFunction when compiled, an InterpretedFunction when interpreted), because neither runner can
call the other's.

Each kernel module lists the configurations it ships (`AOT_CONFIGS`); dlcore/_static_check.py compiles every
one of them ahead of time for sm_90 and fails the tests on a register spill or a shared-memory overflow.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def patch_interpreter_bf16() -> bool:
    """Make Triton's interpreter treat bf16 as compiled code does (upstream bugs in 3.6-3.9):
    - tl.dot multiplies bf16 operands as their raw uint16 bit patterns: upcast them to fp32 first (exact);
    - fp32 → bf16 casts truncate: round to nearest even, as the GPU's cvt.rn.bf16.f32 does.
    Idempotent; returns True once the patches are in place."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_dlcore_bf16_fix", False):
        return True
    original_dot = getattr(builder, "create_dot", None)
    original_cast = getattr(builder, "cast_impl", None)
    if original_dot is None or original_cast is None:  # another triton layout: leave it alone, say so
        import warnings

        warnings.warn("dlcore: this triton's interpreter has no create_dot/cast_impl; bf16 fixes not applied")
        return False

    def is_bf16(dtype):
        return getattr(dtype, "scalar", dtype) == tl.bfloat16

    def upcast(handle):
        if is_bf16(handle.dtype):
            return interp.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if is_bf16(dst_type) and src.dtype.scalar == tl.float32:
            u = np.ascontiguousarray(src.data).view(np.uint32).astype(np.uint64)
            nan = (u & 0x7FFFFFFF) > 0x7F800000
            rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
            out = np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)
            return interp.TensorHandle(out, tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._dlcore_bf16_fix = True
    return True


class DualHelper:
    """A device function called from DualKernels (and other helpers); never launched on its own."""

    def __init__(self, fn, interpreted=None):
        self.fn = fn
        self.__name__ = fn.__name__
        self._built = {}
        if interpreted is not None:  # what the interpreter should call instead (see the combiners below)
            self._built[InterpretedFunction] = interpreted

    def build(self, runner: type):
        if runner not in self._built:
            self._built[runner] = runner(_with_helpers(self.fn, runner))
        return self._built[runner]


def _with_helpers(fn, runner: type):
    """`fn` re-bound to a copy of its module's globals in which every DualHelper it names is `runner`'s build."""
    helpers = {name: fn.__globals__[name].build(runner) for name in fn.__code__.co_names
               if isinstance(fn.__globals__.get(name), DualHelper)}
    if not helpers:
        return fn
    scope = {**fn.__globals__, **helpers}
    clone = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__module__, clone.__qualname__, clone.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    return clone


class DualKernel:
    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self._compiled = None
        self._interpreted = None

    @property
    def compiled(self) -> JITFunction:
        if self._compiled is None:
            self._compiled = JITFunction(_with_helpers(self.fn, JITFunction))
        return self._compiled

    @property
    def interpreted(self) -> InterpretedFunction:
        if self._interpreted is None:
            patch_interpreter_bf16()
            self._interpreted = InterpretedFunction(_with_helpers(self.fn, InterpretedFunction))
        return self._interpreted

    def launch(self, grid, device: torch.device, *args, **kwargs):
        runner = self.compiled if torch.device(device).type == "cuda" else self.interpreted
        return runner[grid](*args, **kwargs)


_GPU_TILES_ON_CPU = False

FP32_DOT_PRECISIONS = ("tf32x3", "tf32")  # what dot_precision gives fp32 inputs (the AOT checks compile both)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot's input precision as torch's own op would multiply: 16-bit inputs exactly on tensor cores whatever it
    says ("ieee"); fp32 in TF32 when torch's flag for that op allows it (torch.backends.cuda.matmul.allow_tf32 for
    matmuls and attention, torch.backends.cudnn.allow_tf32 for convolutions), else 3×TF32 (fp32-grade products on
    tensor cores; triton's own default would be plain TF32)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if allow_tf32 else "tf32x3"


def gpu_tiles(t: torch.Tensor) -> bool:
    """Whether a launch on t takes the kernels' GPU tiles: on CUDA tensors, and on CPU tensors inside
    interpret_gpu_tiles() (the interpreter otherwise takes large tiles: its cost is per program)."""
    return t.is_cuda or _GPU_TILES_ON_CPU


@contextlib.contextmanager
def interpret_gpu_tiles():
    """Run the GPU tile sizes (and block counts) through the interpreter: the masks and block ranges at the tiles
    that ship, checked where no GPU is (tests/test_gpu_tiles_interpreted.py)."""
    global _GPU_TILES_ON_CPU
    before, _GPU_TILES_ON_CPU = _GPU_TILES_ON_CPU, True
    try:
        yield
    finally:
        _GPU_TILES_ON_CPU = before


def dual_kernel(fn) -> DualKernel:
    return DualKernel(fn)


def dual_helper(fn) -> DualHelper:
    return DualHelper(fn)


# Philox4x32-10 (csrc/common/philox.h and dlcore/_philox.py compute the same words): dropout masks
# (kernels/attention.py) and the replay buffers' sampling offsets (kernels/sum_tree.py).
def _philox4x32_10(c0, c1, c2, c3, seed):
    """The four output words for uint32 counter tensors (c0, c1, c2, c3) under the 64-bit key `seed`."""
    # a seed below 2^31 arrives as an i32 (Triton types integer arguments by value), and a seed of 1 as a constexpr
    # (the runtime specialises ints equal to 1), which has no .to(): tl.cast takes both
    seed = tl.cast(seed, tl.int64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        a0, a2 = c0, c2
        c0 = tl.umulhi(0xCD9E8D57, a2) ^ c1 ^ k0
        c2 = tl.umulhi(0xD2511F53, a0) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


def _uniform53(seed, counter, i):
    """Element i (an integer tensor) of draw `counter`: float64 in [0, 1) from the top 53 bits of words (w0, w1) of
    counter (i, counter_lo, counter_hi, 1) — csrc/common/philox.h uniform53."""
    counter = tl.cast(counter, tl.int64)  # an i32, an i64, or a constexpr (1 is specialised): see above
    c0 = i.to(tl.uint32)
    zero = c0 * 0
    c1 = zero + (counter & 0xFFFFFFFF).to(tl.uint32)
    c2 = zero + ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, _, _ = philox4x32_10(c0, c1, c2, zero + 1, seed)
    bits = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
    return (bits >> 11).to(tl.float64) * 1.1102230246251565e-16  # 2⁻⁵³


philox4x32_10 = DualHelper(_philox4x32_10)
uniform53 = DualHelper(_uniform53)


# Combine functions for tl.reduce. tl.max / tl.sum are @triton.jit wrappers in triton 3.9 that the interpreter
# cannot call from a compiled-mode import; tl.reduce (a builtin) with these dual-built combiners runs both ways.
# The interpreter reduces with numpy only when the combiner is triton's own (tl.standard._sum_combine /
# _elementwise_max), and otherwise calls the combiner once per element in Python (seconds per 64K-element tile):
# its builds of these two are triton's own where this triton has them. (Its max then skips NaN, as np.nanmax.)
def _maximum(a, b):
    return tl.maximum(a, b)


def _add(a, b):
    return a + b


max_combine = DualHelper(_maximum, interpreted=getattr(tl.standard, "_elementwise_max", None))
sum_combine = DualHelper(_add, interpreted=getattr(tl.standard, "_sum_combine", None))


@dataclass
class AOTConfig:
    """One shipped configuration: the signature's types (Triton strings, e.g. "*fp32", "i64"), the constexprs,
    and launch options."""
    kernel: DualKernel
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    options: dict = field(default_factory=dict)
    # integer arguments compiled as multiples of 16, as the runtime specialises them when they are (strides and
    # lengths of power-of-two shapes): see dlcore._static_check.builds
    divisible_ints: tuple = ()
    # pointer arguments compiled as 16-byte aligned, as the runtime specialises them when they are (every fresh
    # torch allocation is; register use moves both ways with it: 80 -> 174 for the sum-tree update)
    aligned_pointers: bool = False



def aot_signature(kernel: DualKernel, pointers: dict, constexprs: dict, floats=(), int64s=()) -> dict:
    """A kernel's Triton signature for ahead-of-time compilation: each parameter is a constexpr, one of `pointers`
    (name → "*bf16" etc.), an fp32 scalar (named in `floats`), an i64 (named in `int64s`), or else an i32."""
    import inspect

    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        elif name in int64s:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig
