"""Eager-mode calls of dlcore's custom ops without the dispatcher round trips.

Every dlcore op with a gradient is a `torch.library.custom_op` with a fake implementation and a registered
autograd formula, so that torch.compile (and make_fx, fake tensors, opcheck) see one opaque node. In plain eager
mode that wrapping is pure cost: the custom op and its registered autograd hop Python → C++ → Python several times,
~20–50 µs per call on the project's 2-core VMs against ~5 µs for a torch.autograd.Function (pytorch/pytorch#139500,
#176592): a fused conv2d+ReLU forward+backward at a tiny size took 278 µs against 105 µs for torch's two ops.

`eager_autograd(op, setup_context, backward)` returns a callable with the op's signature that, in plain eager mode,
runs the op's Python body inside an autograd.Function built from the *same* setup_context and backward (so both
paths share one formula; it also registers them as the op's autograd), or the body alone when grad mode is off or
no tensor argument requires grad; `direct(op)` does the same for an op without a
gradient (the backward ops, called from those backward functions). Inside torch.func transforms and forward-AD
dual levels the op's body runs on its reference backend (`under_transform`: torch ops the transforms see through;
torch's custom-op autograd wrapper is refused by them). Anything else — torch.compile tracing, a dispatch mode
(fake tensors, make_fx, FlopCounterMode), a torch-function mode (`with torch.device(...)`), tensor subclasses —
takes the custom op itself, as before.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch._C import _functorch
from torch.autograd import forward_ad as _forward_ad

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def in_transform() -> bool:
    """Inside a torch.func transform (grad, vmap, jacrev, jacfwd, hessian), where tensors are wrapped per level,
    have no pointers to hand to a kernel and some queries (is_contiguous for channels-last, under vmap) are not
    implemented for them; or inside a forward-AD dual level (torch.autograd.forward_ad), whose tangents a kernel
    would silently drop (a dual fp32 input's tangent came out None). False while torch.compile traces (it sees the
    custom op, one node)."""
    return _transformed() and not torch.compiler.is_compiling()  # (the cheap test first: ~0.1 µs when false)


def _transformed() -> bool:  # in_transform() without its torch.compile test, for callers that made it already
    return _functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0


def plain_eager(args) -> bool:
    """True when a call with `args` needs nothing the custom op layer provides (see the module docstring)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or _transformed()):
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.is_meta):
            return False  # a subclass (DTensor, a wrapper) or a meta tensor: its dispatch (fake kernel) must see the op
    return True


def values_known(*tensors) -> bool:
    """Whether the tensors' values can be read (for a range check): not when compiling, under a dispatch mode
    (fake tensors), on the meta device or for a tensor subclass — there the check is left out, as torch's own ops
    leave theirs to the device kernel."""
    return not torch.compiler.is_compiling() and plain_eager(tensors)


def autocast_dtype(t: torch.Tensor):
    """The dtype autocast runs t's device in, or None when autocast is off there (a meta tensor: None; asking
    torch about "meta" raises)."""
    if not torch._C._is_any_autocast_enabled() or t.device.type == "meta":
        return None
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_inputs(*tensors) -> list:
    """Autocast's rule for an op on its lower-precision list, when autocast is on for the first argument's device:
    floating tensors other than float64 cast to autocast's dtype (anything else, None included, passes through;
    with autocast off, everything does)."""
    low = autocast_dtype(tensors[0]) if isinstance(tensors[0], torch.Tensor) else None
    if low is None:
        return list(tensors)
    return [t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def bias_in_gemm(input: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether torch's GEMM or convolution should add `bias` itself, not a fused epilogue after it: when its
    output is 16-bit (a 16-bit input with a bias of its dtype, or autocast to 16 bits). torch adds the bias in
    fp32 before its one rounding; rounding x·w first and adding the bias after moves pre-activations near 0 by up
    to 2⁻⁸·|x·w| and flips ReLU masks (bf16 gradients 10–170× torch's own error against float64, measured on
    linear_act and conv2d_relu). fp32 and fp64 keep the fused bias: their rounding is 2⁻²⁴ or finer."""
    if bias is None:
        return False
    cast = autocast_dtype(input)
    if cast is not None:
        return cast in HALF_DTYPES
    return input.dtype in HALF_DTYPES and bias.dtype == input.dtype


def wants_grad(args) -> bool:
    """Whether any tensor argument (or a tensor in a list/tuple argument: Tensor[] in a schema) requires grad."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif (isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)
              and any(t.requires_grad for t in a if isinstance(t, torch.Tensor))):
            return True
    return False


def _body(op) -> Callable:
    """The Python function a torch.library.custom_op was made from (one implementation for every device)."""
    fn = getattr(op, "_init_fn", None)
    if fn is None or set(getattr(op, "_backend_fns", {})) - {None}:
        raise TypeError(f"{op} has per-device kernels; eager_autograd needs a single implementation")
    return fn


def torch_ops_backward(*grads) -> bool:
    """Whether a backward function, handed `grads`, must form its gradients from torch ops, not the kernels: under
    create_graph=True (grad mode on in backward: the gradients are differentiated again), inside a torch.func
    transform, or with a gradient batched by torch's legacy vmap (autograd.grad(..., is_grads_batched=True),
    torch.autograd.functional.jacobian(vectorize=True)), which has no pointer for a kernel."""
    return (torch.is_grad_enabled() or _transformed()
            or any(g is not None and _functorch.is_legacy_batchedtensor(g) for g in grads))


def differentiable_grads(fn: Callable, inputs: tuple, grad_output: torch.Tensor,
                         needed: Optional[Sequence[bool]] = None) -> list:
    """The gradients of fn(*inputs) against grad_output with respect to the inputs that are needed (default: those
    that require grad; None for the others and for None entries), by autograd: the torch-op branch of the ops'
    backward functions (torch_ops_backward), with create_graph=True when grad mode is on, so that autograd can
    differentiate the gradients again.
    Each needed input enters fn as its own alias (t.view_as(t)): an input passed twice (self-attention's
    q = k = v = h) would otherwise get the whole gradient at each place, and autograd, which sums the parts an op
    returns, would count it three times."""
    needed = [(needed is None or bool(needed[i])) and t is not None and t.requires_grad for i, t in enumerate(inputs)]
    create_graph = torch.is_grad_enabled()  # (off: a vmapped first-order backward, see torch_ops_backward)
    with torch.enable_grad():
        args = [t.view_as(t) if n else t for n, t in zip(needed, inputs)]
        output = fn(*args)
        wanted = [a for n, a in zip(needed, args) if n]
        grads = iter(torch.autograd.grad(output, wanted, grad_output.to(output.dtype), create_graph=create_graph)
                     if wanted else ())
    return [next(grads) if n else None for n in needed]


def direct(op) -> Callable:
    """op's Python body in plain eager mode with grad mode off, op itself otherwise: for the backward ops, called
    from backward functions. The ops' backward functions form differentiable gradients from torch ops under
    create_graph=True and call the kernels only with grad mode off; a kernel backward reached with grad mode on
    anyway (the backward op called directly) returns outputs carrying the raising node registered here, so a
    second derivative through it raises (saying so) instead of silently leaving its part out."""
    body = _body(op)
    name = op._name.split("::")[-1].removesuffix("_backward")

    def no_second_derivative(ctx, *grads):
        raise RuntimeError(
            f"dlcore {name} has no second derivative: its kernels' backward ran with grad mode on and something "
            f"now differentiates that gradient (a gradient penalty, double backprop, a Hessian-vector product). "
            f"Differentiate through the op's public function instead: under create_graph=True its backward forms "
            f"a gradient autograd can differentiate.")

    op.register_autograd(no_second_derivative, setup_context=lambda ctx, inputs, output: None)

    def call(*args):
        return body(*args) if not torch.is_grad_enabled() and plain_eager(args) else op(*args)

    call.__name__ = call.__qualname__ = f"direct_{op._name}"
    return call


def under_transform(body: Callable, args):
    """An op's body on its plain-PyTorch reference backend, for a call inside torch.func transforms (grad, vmap,
    jacrev, jacfwd, hessian, functional_call): they see through its torch ops as through any composite. The custom
    op cannot take them: torch's register_autograd wrapper is a legacy autograd.Function without setup_context,
    which the transforms refuse (pytorch/pytorch#170834), and the kernels read raw pointers, which no transform
    can batch or trace."""
    from dlcore import _dispatch

    with _dispatch.use_backend("reference"):
        return body(*args)


def eager_autograd(op, setup_context: Callable, backward: Callable) -> Callable:
    """Registers (setup_context, backward) as op's autograd (what compiled and traced calls use) and returns a
    callable with op's signature that runs the same pair outside the op in plain eager mode (the body alone when
    grad mode is off or no tensor argument requires grad)."""
    op.register_autograd(backward, setup_context=setup_context)
    body = _body(op)

    def forward(ctx, *args):
        # setup_context called here, not declared on the Function: a declared one makes every apply() bind the
        # arguments with inspect.signature (~20 µs); functorch transforms, which need it declared, take the op
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    Function = type(f"{op._name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if not plain_eager(args):
            return under_transform(body, args) if in_transform() else op(*args)
        if not torch.is_grad_enabled() or not wants_grad(args):
            return body(*args)  # inference, or no input wants a gradient: no graph to record
        return Function.apply(*args)

    call.__name__ = call.__qualname__ = f"eager_{op._name}"
    return call
