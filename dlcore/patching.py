"""The model rewrites: dlcore.patch(model) and dlcore.fuse_for_inference(model), both in place.

patch(model) — for training and inference alike; every swap shares the old modules' parameters and buffers (the
same tensors, so optimizers already built keep working) and leaves the state_dict keys as they were:
- torchvision-style ResNet blocks → dlcore.nn.BasicBlock / Bottleneck (recognised by class name and exactly
  torchvision's children: a block with more — a squeeze-excitation, another norm or activation, a ResNet-D
  shortcut — is left as it is), the stem's bn1 + relu → BatchNorm2dReLU (when relu is an nn.ReLU and the
  model has layer1: a block's own conv1 → bn1 → relu is no stem);
- runs of layers inside an nn.Sequential (or a subclass that keeps Sequential's forward, as torchvision's
  Conv2dNormActivation does), by the table RUNS below: the first module of a run becomes the fused layer and the
  rest nn.Identity, so the indices (features.3.weight, …) stay; only exact torch.nn types match, so a subclass
  with its own forward is never swapped;
- nn.LayerNorm → dlcore.nn.LayerNorm, nn.Linear → dlcore.nn.Linear (the skinny CPU GEMM for few rows) and
  nn.MultiheadAttention → dlcore.nn.MultiheadAttention, by a class swap (they add no state); dlcore's attention
  runs for need_weights=False calls, as nn.TransformerEncoderLayer and DecoderLayer make, torch's forward
  otherwise.
A run the fused layer cannot express (a max pool with dilation or returned indices), and any module with
forward or backward hooks (fusing would drop them, and what they observe), is left as it was. Dropout after a
fused Linear + ReLU draws its mask from dlcore's Philox stream, not torch's generator.

fuse_for_inference(model) — eval mode, batch norms folded into the convolution before them (FoldedConv2d): the
ResNet blocks and stem as before, and Sequential runs (Conv2d, BatchNorm2d[, ReLU[, MaxPool2d]]) — VGG-BN,
torchvision's Conv2dNormActivation — then everything patch() swaps; a folded ResNet converts an NCHW input to
channels-last once, on entry (run_channels_last).
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from dlcore import _eager
from dlcore import nn as dnn
from dlcore.blocks import BasicBlock, BatchNorm2dReLU, Bottleneck, FoldedConv2d, _FusedBlock, has_hooks, is_projection
from dlcore.ops.batch_norm import is_channels_last
from dlcore.ops.conv_pool import fusable_pool

# (module types in order, builder(*modules) → the fused module in the first one's place); longest first where
# runs share a start. A builder raising ValueError or TypeError leaves the run as it was.
RUNS: tuple[tuple[tuple[type, ...], Callable[..., nn.Module]], ...] = (
    ((nn.Conv2d, nn.ReLU, nn.MaxPool2d), dnn.Conv2dReLUMaxPool2d.from_modules),
    ((nn.Conv2d, nn.ReLU), dnn.Conv2dReLU.from_modules),
    ((nn.Linear, nn.ReLU, nn.Dropout), dnn.LinearReLUDropout.from_modules),
    ((nn.Linear, nn.ReLU), dnn.LinearReLUDropout.from_modules),
    ((nn.Linear, nn.GELU), dnn.LinearGELU.from_modules),
    ((nn.BatchNorm2d, nn.ReLU), lambda bn, _: dnn.BatchNorm2dReLU.from_module(bn)),
    ((nn.BatchNorm2d, nn.LeakyReLU), lambda bn, act: dnn.BatchNorm2dLeakyReLU.from_module(bn, act.negative_slope)),
    ((nn.BatchNorm1d, nn.ReLU), lambda bn, _: dnn.BatchNorm1dReLU.from_module(bn)),
)


def fold_runs(winograd: bool = False):
    """fuse_for_inference's table for Sequential runs: batch norm running statistics folded into the convolution
    (eval mode only); `winograd` as fuse_for_inference's."""
    def fold(conv, bn, relu=False, pool=None):
        return FoldedConv2d.fold(conv, bn, relu=relu, pool=pool, winograd=winograd)

    return (((nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d),
             lambda conv, bn, _, pool: fold(conv, bn, True, _plain_pool(pool))),
            ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU), lambda conv, bn, _: fold(conv, bn, True)),
            ((nn.Conv2d, nn.BatchNorm2d), fold))


# exact torch.nn type → dlcore's subclass that adds no state (the instance's class is swapped)
CLASS_SWAPS: dict[type, type] = {nn.LayerNorm: dnn.LayerNorm, nn.MultiheadAttention: dnn.MultiheadAttention,
                                  nn.Linear: dnn.Linear}


def _plain_pool(pool: nn.MaxPool2d) -> nn.MaxPool2d:
    if not fusable_pool(pool):
        raise ValueError("only max pools with dilation 1 and no returned indices fold into a convolution")
    return pool


def _sequentials(model: nn.Module, skip: Iterable[nn.Module] = ()) -> list[nn.Sequential]:
    """The Sequential containers in `model` that run their children in order (Sequential's own forward)."""
    skipped = {id(m) for m in skip}
    return [m for m in model.modules() if isinstance(m, nn.Sequential)
            and type(m).forward is nn.Sequential.forward and id(m) not in skipped]


def replace_runs(model: nn.Module, table, skip: Iterable[nn.Module] = ()) -> int:
    """Replace, in every Sequential of `model` (but those in `skip`), each run of children whose exact types are
    a table entry's by that entry's fused module followed by nn.Identity placeholders. Returns how many."""
    count = 0
    for seq in _sequentials(model, skip):
        names = list(seq._modules)
        i = 0
        while i < len(names):
            for types, build in table:
                run = [seq._modules[n] for n in names[i:i + len(types)]]
                if len(run) < len(types) or any(type(m) is not t for m, t in zip(run, types)) or has_hooks(*run):
                    continue
                try:
                    fused = build(*run)
                except (ValueError, TypeError):  # a configuration the fused layer does not cover
                    continue
                seq._modules[names[i]] = fused
                for name in names[i + 1:i + len(types)]:
                    seq._modules[name] = nn.Identity().train(run[0].training)
                i += len(types) - 1
                count += 1
                break
            i += 1
    return count


def _stem(model: nn.Module) -> Optional[str]:
    """A torchvision ResNet's stem (layer1 … after conv1 → bn1 → relu → maxpool, relu used there alone): "plain"
    (Conv2d, BatchNorm2d, ReLU), "fused" (Conv2d, dlcore's BatchNorm2dReLU, Identity: patched, or dlcore's
    ResNet), else None. Exact types only: another activation, or a block (which also has conv1, bn1 and relu but
    reuses relu after its residual add), is no stem."""
    if not hasattr(model, "layer1") or type(getattr(model, "conv1", None)) is not nn.Conv2d:
        return None
    kinds = (type(getattr(model, "bn1", None)), type(getattr(model, "relu", None)))
    stem = {(nn.BatchNorm2d, nn.ReLU): "plain", (BatchNorm2dReLU, nn.Identity): "fused"}.get(kinds)
    if stem is None or has_hooks(model.conv1, model.bn1, model.relu, getattr(model, "maxpool", None)):
        return None
    return stem


def _torchvision_block(module: nn.Module) -> Optional[type]:
    """dlcore's block class for a torchvision block (by class name and exactly torchvision's children), else None."""
    block_cls = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}.get(type(module).__name__)
    if block_cls is None or isinstance(module, _FusedBlock) or not block_cls.matches(module):
        return None
    return block_cls


def _block_downsamples(model: nn.Module) -> list[nn.Module]:
    """The projection shortcuts of the model's residual blocks (folded by the blocks themselves)."""
    return [m.downsample for m in model.modules()
            if (isinstance(m, _FusedBlock) or _torchvision_block(m) is not None)
            and m.downsample is not None and is_projection(m.downsample)]


def patch(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Swap, in place, the layers of an existing model for dlcore's fused ones (see the module docstring: ResNet
    blocks and stem, Sequential runs such as Conv2d → ReLU → MaxPool2d, Linear → ReLU → Dropout, BatchNorm2d →
    ReLU, and LayerNorm / Linear / MultiheadAttention), sharing their parameters and buffers; returns the model.
    The state_dict is unchanged, so checkpoints load before or after patching; patching twice changes nothing more.
    verbose: print which dlcore modules the model gained (e.g. "dlcore.patch: Conv2dReLUMaxPool2d ×3, …")."""
    before = Counter(type(m) for m in model.modules()) if verbose else None
    _patch(model)
    if before is not None:
        after = Counter(type(m) for m in model.modules())
        gained = [f"{t.__name__} ×{n - before[t]}" for t, n in after.items()
                  if n > before[t] and t.__module__.startswith("dlcore")]
        print("dlcore.patch: " + (", ".join(gained) if gained else "nothing to swap"))
    return model


def _patch(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            block_cls = _torchvision_block(child)
            if block_cls is not None:
                setattr(parent, name, block_cls.from_block(child))
    if _stem(model) == "plain":
        model.bn1, model.relu = BatchNorm2dReLU.from_module(model.bn1), nn.Identity()
    replace_runs(model, RUNS)
    swap_classes(model)


def swap_classes(model: nn.Module, swaps: Optional[dict] = None) -> nn.Module:
    """Give every module of an exact type in `swaps` (default CLASS_SWAPS) its dlcore subclass, in place (the
    subclasses add no state: parameters, buffers and hooks stay). The dlcore models call it for nn.Linear."""
    swaps = CLASS_SWAPS if swaps is None else swaps
    for module in model.modules():
        swap = swaps.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model


def fuse_for_inference(model: nn.Module, winograd: bool = False) -> nn.Module:
    """Put `model` in eval mode and fold its batch norms, in place: every dlcore BasicBlock / Bottleneck becomes
    fused convolutions (bias + residual + ReLU epilogue), a ResNet stem (conv1, bn1, relu, maxpool) one
    conv + ReLU + max-pool, and each Sequential run (Conv2d, BatchNorm2d[, ReLU[, MaxPool2d]]) one FoldedConv2d;
    then the rest is patched (patch()). A model whose stem was folded takes its input channels-last from then on
    (run_channels_last: converted once on entry, a 4-D result handed back in the input's layout). Returns the
    model (for training again, build a new one).

    winograd: run the 3×3 stride-1 convolutions by Winograd F(4×4,3×3) in CPU inference (fp32/fp64), at
    the output sizes where it pays (dlcore.ops.winograd.worthwhile):
    1.0–1.5× faster per convolution inside ResNet-18 on the development VM (1.2–1.9× alone; the whole network
    138 → 114 ms at batch 8), at more fp32 rounding error than a direct convolution (1.3–2.7× inside a block,
    8–11× for a bare convolution; see dlcore/ops/winograd.py)."""
    replace_runs(model, fold_runs(winograd), skip=_block_downsamples(model))  # before patch() pairs BN with ReLU
    patch(model)
    model.eval()
    for module in model.modules():
        if isinstance(module, _FusedBlock):
            module.fuse_(winograd=winograd)
    if _stem(model) == "fused":  # patch() above made a plain stem fused
        pool = model.maxpool if fusable_pool(getattr(model, "maxpool", None)) else None
        model.conv1 = FoldedConv2d.fold(model.conv1, model.bn1, relu=True, pool=pool)
        model.bn1, model.relu = nn.Identity(), nn.Identity()
        if pool is not None:
            model.maxpool = nn.Identity()
        run_channels_last(model)
    return model


# Per thread, for each call in progress of a model run_channels_last() converted: whether its input was converted.
_converted_inputs = threading.local()


def _convert_input(model: nn.Module, args: tuple):
    x = args[0] if args else None
    convert = isinstance(x, torch.Tensor) and x.dim() == 4 and not is_channels_last(x) and not _eager.in_transform()
    stack = getattr(_converted_inputs, "stack", None)
    if stack is None:
        stack = _converted_inputs.stack = []
    stack.append(convert)
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if convert else None


def _restore_output(model: nn.Module, args: tuple, output):
    # this hook runs even when forward raised, so the stack stays matched; it is empty only when a global
    # pre-hook raised before _convert_input ran (it runs first of the model's own)
    stack = getattr(_converted_inputs, "stack", None)
    converted = stack.pop() if stack else False
    if converted and isinstance(output, torch.Tensor) and output.dim() == 4:
        return output.contiguous()
    return None


def run_channels_last(model: nn.Module) -> nn.Module:
    """Convert a 4-D NCHW input of `model` to channels-last once, on entry, and a 4-D result back to NCHW.

    Folded convolutions compute channels-last and pass that on inside a residual block, but each block (and the
    stem) gives its result its input's layout, so an NCHW caller may .view() it: fed NCHW, a folded ResNet paid a
    layout copy into and out of every block (ResNet-18, batch 8, 224², Intel Xeon VM: 147 ms against 127 ms fed
    channels-last). fuse_for_inference applies this to a model whose ResNet stem it folded, where the input goes
    straight to the stem; between stem and blocks the activations stay channels-last (same values), and a
    torchvision ResNet's result is 2-D as before. A forward pre-hook and a forward hook, in place; returns model."""
    model.register_forward_pre_hook(_convert_input, prepend=True)
    model.register_forward_hook(_restore_output, always_call=True)
    return model
