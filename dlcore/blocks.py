"""Residual blocks and batch-norm layers on dlcore's fused kernels (issue 6):

- BatchNorm1d / BatchNorm2d (+ReLU, +LeakyReLU): nn.BatchNorm with the statistics, normalise, affine, an optional
  residual add and the activation fused (dlcore.functional.batch_norm_act); same arguments and state_dict keys.
- BasicBlock / Bottleneck: torchvision's arguments, attributes and state_dict keys; in training each BN + ReLU
  (and the last BN + residual add + ReLU) is one fused op.
- FoldedConv2d: a convolution with a batch norm folded in (w' = w·γρ, b' = β + (b − μ)·γρ) whose epilogue adds
  the bias, the residual and applies ReLU in one pass (dlcore.functional.conv2d_relu): a fused BasicBlock is two
  launches, a Bottleneck three (+1 for a projection). On the CPU in fp32 a folded conv runs oneDNN's convolution
  with bias/residual/ReLU post-ops, or (winograd=True) Winograd F(4×4,3×3) for its 3×3 stride-1 convolutions
  (dlcore/ops/winograd.py).
The model rewrites that use them (dlcore.patch, dlcore.fuse_for_inference) are dlcore/patching.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlcore import _eager
from dlcore.ops import winograd
from dlcore.ops.batch_norm import batch_norm_act, dense_like, is_channels_last
from dlcore.ops.conv_pool import conv2d_relu_maxpool2d, cpu_maxpool_inference
from dlcore.ops.conv_relu import conv2d_relu


# ---------------------------------------------------------------------------------------------------- batch norm
class _BatchNormAct(nn.modules.batchnorm._BatchNorm):
    """act(BatchNorm(x) + residual) as one op; `activation` is fixed per class (see the table below)."""

    activation = "identity"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, negative_slope: float = 0.01):
        if self.activation == "leaky_relu" and not negative_slope >= 0:  # raised here so patch() leaves the run
            raise ValueError(f"negative_slope must be >= 0 (the backward reads the sign from the output), "
                             f"got {negative_slope}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.negative_slope = negative_slope

    @classmethod
    def from_module(cls, bn: nn.modules.batchnorm._BatchNorm, negative_slope: float = 0.01):
        """The fused layer sharing `bn`'s parameters and buffers (its state_dict keys too)."""
        fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta",
                    negative_slope=negative_slope)
        for name in ("weight", "bias"):
            setattr(fused, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            fused._buffers[name] = bn._buffers.get(name)
        fused.train(bn.training)
        return fused

    def forward(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input_dim(input)
        # torch's rule: batch statistics in training, or in eval when no running statistics are kept
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        update = self.training and self.track_running_stats
        return batch_norm_act(input, self.running_mean if not self.training or update else None,
                              self.running_var if not self.training or update else None, self.weight, self.bias,
                              use_batch, self.momentum, self.eps, residual=residual, activation=self.activation,
                              negative_slope=self.negative_slope,
                              num_batches_tracked=self.num_batches_tracked if update else None)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return super().extra_repr() + slope


def _batch_norm_class(name: str, base: type, activation: str) -> type:
    doc = (f"{base.__name__}{' followed by ' + activation if activation != 'identity' else ''} as one fused op "
           f"(dlcore.functional.batch_norm_act): {base.__name__}'s arguments (+ negative_slope), parameters and "
           f"state_dict keys. forward(x, residual=None) → {activation}(bn(x) + residual).")
    return type(name, (_BatchNormAct, base), {"activation": activation, "__doc__": doc,
                                               "__module__": __name__})


BatchNorm1d = _batch_norm_class("BatchNorm1d", nn.BatchNorm1d, "identity")
BatchNorm1dReLU = _batch_norm_class("BatchNorm1dReLU", nn.BatchNorm1d, "relu")
BatchNorm2d = _batch_norm_class("BatchNorm2d", nn.BatchNorm2d, "identity")
BatchNorm2dReLU = _batch_norm_class("BatchNorm2dReLU", nn.BatchNorm2d, "relu")
BatchNorm2dLeakyReLU = _batch_norm_class("BatchNorm2dLeakyReLU", nn.BatchNorm2d, "leaky_relu")


# ---------------------------------------------------------------------------------------------------- folding
def _version(t: torch.Tensor) -> int:
    """t's in-place version counter, the key of the caches derived from a weight; an inference tensor (a model
    folded under torch.inference_mode) has none, and raises when asked: -1 (its in-place edits go unseen)."""
    return -1 if t.is_inference() else t._version


class FoldedConv2d(nn.Conv2d):
    """A convolution with batch norm folded in (inference only): y = [relu](conv(x, w') + b' + residual), or with
    `pool` (an nn.MaxPool2d, ReLU on) y = maxpool(relu(conv(x, w') + b')) — a ResNet stem, dlcore's
    conv2d_relu_maxpool2d op. On the CPU the ReLU is oneDNN's fused post-op (as in torch.compile's CPU code),
    which turns a NaN into 0 where eager torch.relu keeps it; the opt-in Winograd form spreads a NaN or inf of the
    input over its 4×4 output tile."""

    def __init__(self, *args, relu: bool = False, pool: Optional[nn.MaxPool2d] = None, winograd: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = relu
        self.pool = pool
        self.winograd = winograd  # CPU inference of a 3×3 stride-1 conv by Winograd F(4×4,3×3): dlcore/ops/winograd.py
        # False inside a fused block, whose inner results nobody else sees: the CPU paths' channels-last output is
        # passed on as it is (see _layout_of)
        self.caller_layout = True

    @classmethod
    @torch.no_grad()
    def fold(cls, conv: nn.Conv2d, bn: Optional[nn.modules.batchnorm._BatchNorm], relu: bool,
             pool: Optional[nn.MaxPool2d] = None, winograd: bool = False) -> "FoldedConv2d":
        """w' = w·γρ, b' = β + (b − μ)·γρ with ρ = 1/√(σ²_running + ε), computed in float64. `winograd`: see
        fuse_for_inference."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("fuse_for_inference folds convolutions with padding_mode='zeros' and integer padding")
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, True, relu=relu or pool is not None, pool=pool, winograd=winograd,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        w = conv.weight.double()
        b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64,
                                                                          device=w.device)
        if bn is not None:
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
            scale = (bn.running_var.double() + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.double()
            b = (b - bn.running_mean.double()) * scale + (bn.bias.double() if bn.bias is not None else 0.0)
            w = w * scale[:, None, None, None]
        folded.weight.copy_(w)
        folded.bias.copy_(b)
        return folded.train(False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pool is not None:
            if residual is not None:
                raise ValueError("a FoldedConv2d with a max pool takes no residual")
            if _onednn_usable(self, x, None):  # oneDNN's conv + ReLU beats conv + our pool epilogue here (~1 ms)
                z = self._onednn_forward(x, None)
                y = cpu_maxpool_inference(z, self.pool)  # our pool without argmax; torch's keeps indices
                return self._layout_of(x, self.pool(z) if y is None else y)
            p = self.pool
            return conv2d_relu_maxpool2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                         self.groups, p.kernel_size, p.stride, p.padding, p.ceil_mode)
        if self.winograd and _winograd_usable(self, x, residual):
            return self._layout_of(x, self._winograd_forward(x, residual))
        if _onednn_usable(self, x, residual):
            return self._layout_of(x, self._onednn_forward(x, residual))
        if self.relu:
            return conv2d_relu(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                               residual=residual)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y if residual is None else y + residual

    # per-shape caches derived from the weights (oneDNN's packed weights: an opaque tensor, which neither pickles nor
    # deep-copies); rebuilt on the next call, so a copy or a saved model leaves them out
    _CACHES = ("_packed", "_packed_key", "_winograd_weight", "_winograd_key")

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self._CACHES:
            state.pop(name, None)
        return state

    def _layout_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y in x's memory format, as nn.Conv2d returns it: the CPU inference paths compute channels-last, and an
        NCHW caller may .view() the output. Inside a folded residual block (caller_layout False) only the block's
        result is converted (_FusedBlock.forward). Feed channels_last (model.to(memory_format=torch.channels_last))
        to skip the copies (README, "Memory format")."""
        return y if not self.caller_layout or is_channels_last(x) else y.contiguous()

    def _onednn_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """CPU fp32 inference: oneDNN's convolution with the bias, the residual add and ReLU as post-ops of the
        convolution itself (no pass over the output after it), weights reordered once into oneDNN's blocked layout
        for this input shape (cached; re-done when the weights change). Measured here 10% faster than the
        convolution followed by dlcore's one-pass epilogue on ResNet-18 (the same primitive inductor uses when it
        freezes a model)."""
        key = (tuple(x.shape), _version(self.weight), self.weight.data_ptr())
        if getattr(self, "_packed_key", None) != key:
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
                self.groups, list(x.shape))
            self._packed_key = key
        conf = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        act = "relu" if self.relu else "none"
        pointwise = torch.ops.mkldnn._convolution_pointwise
        if residual is None:
            return pointwise(x, self._packed, self.bias, *conf, act, [], "")
        residual = dense_like(residual, x)
        return pointwise.binary(x, residual, self._packed, self.bias, *conf, "add", None, act, [], "")

    def _winograd_forward(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        """CPU inference by Winograd F(4×4,3×3) (dlcore/ops/winograd.py); the transformed weights are computed once
        (float64) and re-done when the weights change."""
        key = (_version(self.weight), self.weight.data_ptr(), self.weight.dtype)
        if getattr(self, "_winograd_key", None) != key:
            self._winograd_weight = winograd.transform_weight(self.weight)
            self._winograd_key = key
        return winograd.conv3x3(x, self._winograd_weight, self.bias, residual, self.padding, self.relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "") + (", winograd=True" if self.winograd
                                                                             else "")


def _cpu_inference(conv: FoldedConv2d, x: torch.Tensor, residual: Optional[torch.Tensor], dtypes) -> bool:
    """A CPU-only inference path may run: CPU, x and weight of one dtype in `dtypes`, no autograd, dense input, a
    residual of the output's batch, channels and dtype, not under torch.compile (which traces the portable path)
    and no dlcore backend forced."""
    from dlcore._dispatch import requested_backend

    if (x.device.type != "cpu" or x.dtype not in dtypes or x.dim() != 4 or conv.weight.dtype != x.dtype
            or _eager.in_transform()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return False
    if residual is not None and (residual.shape != (x.shape[0], conv.out_channels) + residual.shape[2:]
                                 or residual.dtype != x.dtype or residual.dim() != 4):
        return False
    if torch.compiler.is_compiling() or requested_backend() is not None or _eager.autocast_dtype(x) is not None:
        return False  # (under autocast the portable path computes in autocast's dtype, as nn.Conv2d)
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _onednn_usable(conv: FoldedConv2d, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """oneDNN's fused inference path applies: fp32 `_cpu_inference` with the ops present in this torch."""
    return _ONEDNN_FUSED and _cpu_inference(conv, x, residual, (torch.float32,))


def _winograd_usable(conv: FoldedConv2d, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    """The Winograd path applies: fp32/fp64 `_cpu_inference` of a 3×3 stride-1 convolution, of an output size
    where it pays (winograd.worthwhile: enough tiles, little padding), and a residual (if any) exactly the output's
    shape (the output pass reads it in place, no broadcasting)."""
    if not _cpu_inference(conv, x, residual, (torch.float32, torch.float64)):
        return False
    if not winograd.applies(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups):
        return False
    ho, wo = winograd.output_size(x.shape[2], x.shape[3], conv.padding)
    if not winograd.worthwhile(x.shape[0], ho, wo, conv.in_channels, conv.out_channels, x.element_size()):
        return False
    out = (x.shape[0], conv.out_channels, ho, wo)
    return residual is None or tuple(residual.shape) == out and (
        residual.is_contiguous() or residual.is_contiguous(memory_format=torch.channels_last))


_ONEDNN_FUSED = bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                     and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


# ---------------------------------------------------------------------------------------------------- blocks
def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, dilation, groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


def has_hooks(*modules: Optional[nn.Module]) -> bool:
    """Whether any of `modules` has forward or backward hooks: a module replaced by a fused one would drop them,
    and the intermediate they observe may not exist any more, so the rewrites leave such modules as they are."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(m is not None and any(getattr(m, name, None) for name in names) for m in modules)


def is_projection(downsample) -> bool:
    """None or torchvision's projection shortcut, Sequential(Conv2d[, BatchNorm2d]) (dlcore's BatchNorm2d too, or
    the folded form)."""
    if downsample is None:
        return True
    kinds = tuple(type(m) for m in downsample) if type(downsample) is nn.Sequential else None
    return kinds in ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv2d, BatchNorm2d), (nn.Conv2d,), (FoldedConv2d,))


class _FusedBlock(nn.Module):
    """Shared by BasicBlock and Bottleneck: the convs and BNs are named convK / bnK (torchvision's names); every
    bnK but the last applies ReLU, the last adds the shortcut and then applies ReLU."""

    expansion = 1
    depth = 2  # number of (conv, bn) pairs

    def _pairs(self):
        return [(getattr(self, f"conv{k}"), getattr(self, f"bn{k}")) for k in range(1, self.depth + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for k, (conv, bn) in enumerate(self._pairs(), start=1):
            residual = identity if k == self.depth else None
            if isinstance(conv, FoldedConv2d):  # after fuse_(): the conv's epilogue does BN, residual and ReLU
                out = conv(out, residual=residual)
            else:
                out = bn(conv(out), residual=residual)
        # folded, the convolutions pass channels-last on (FoldedConv2d.caller_layout); the result takes x's format
        return out if is_channels_last(x) else out.contiguous()

    @torch.no_grad()
    def fuse_(self, winograd: bool = False) -> "_FusedBlock":
        """Fold every BN into its convolution (inference only; see fuse_for_inference). A projection shortcut is
        folded when it is torchvision's Sequential(Conv2d[, BatchNorm2d]); any other (ResNet-D's average pool
        first, say) is left to run as it is, and so is any pair or shortcut with hooks (see has_hooks)."""
        for k, (conv, bn) in enumerate(self._pairs(), start=1):
            if not isinstance(conv, FoldedConv2d) and not has_hooks(conv, bn):
                setattr(self, f"conv{k}", FoldedConv2d.fold(conv, bn, relu=True, winograd=winograd))
                setattr(self, f"bn{k}", nn.Identity())
                getattr(self, f"conv{k}").caller_layout = False  # forward() gives the block's result x's layout
        shortcut = self.downsample
        if (shortcut is not None and is_projection(shortcut) and type(shortcut[0]) is nn.Conv2d
                and not has_hooks(shortcut, *shortcut)):
            bn = self.downsample[1] if len(self.downsample) > 1 else None
            self.downsample = nn.Sequential(FoldedConv2d.fold(self.downsample[0], bn, relu=False))
            self.downsample[0].caller_layout = False  # the residual, read by conv{depth} only
        return self

    @classmethod
    def matches(cls, block: nn.Module) -> bool:
        """Whether `block` is built as torchvision's block of this kind: exactly the children conv1..convK (nn.Conv2d),
        bn1..bnK (nn.BatchNorm2d), relu (nn.ReLU) and an optional torchvision projection shortcut, and a stride.
        Anything more (a squeeze-excitation, another activation or norm, a different shortcut) means a forward
        this block does not compute, so such blocks are not converted."""
        pairs = [(f"conv{k}", nn.Conv2d) for k in range(1, cls.depth + 1)]
        pairs += [(f"bn{k}", nn.BatchNorm2d) for k in range(1, cls.depth + 1)] + [("relu", nn.ReLU)]
        children = dict(block.named_children())
        if not hasattr(block, "stride") or not is_projection(getattr(block, "downsample", False)):
            return False
        if has_hooks(block, *children.values()):
            return False
        if set(children) - {"downsample"} != {name for name, _ in pairs}:
            return False
        return all(type(children[name]) is kind for name, kind in pairs)

    @classmethod
    def from_block(cls, block: nn.Module) -> "_FusedBlock":
        """A dlcore block sharing a torchvision-style block's modules (parameters and buffers are the same objects);
        `block` must pass cls.matches."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for k in range(1, cls.depth + 1):
            conv, bn = getattr(block, f"conv{k}"), getattr(block, f"bn{k}")
            setattr(fused, f"conv{k}", conv)
            setattr(fused, f"bn{k}", BatchNorm2dReLU.from_module(bn) if isinstance(bn, nn.BatchNorm2d) else bn)
        fused.downsample = block.downsample
        fused.stride = block.stride
        fused.relu = nn.ReLU(inplace=True)  # kept for torchvision's attribute set; the fused ops apply ReLU
        fused.train(block.training)
        return fused


class BasicBlock(_FusedBlock):
    """torchvision's BasicBlock (same arguments, attributes, state_dict keys) on dlcore's fused BN + ReLU + add."""

    expansion = 1
    depth = 2

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        norm = norm_layer or BatchNorm2dReLU  # a norm_layer must take forward(x, residual=None), as dlcore's do
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.downsample = downsample
        self.stride = stride


class Bottleneck(_FusedBlock):
    """torchvision's Bottleneck (ResNet v1.5: stride on the 3×3), same arguments, attributes and state_dict keys."""

    expansion = 4
    depth = 3

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm = norm_layer or BatchNorm2dReLU
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
