"""ResNet (He et al. 2015) on dlcore: torchvision's architecture, module names and state_dict keys, so torchvision
checkpoints load unchanged into either twin.

dlcore path (default): every BN + ReLU is one fused op and each block ends in one fused BN + residual add + ReLU
(dlcore.nn.BasicBlock / Bottleneck); `dlcore.fuse_for_inference(model)` then folds the BNs into the convolutions
(a BasicBlock becomes two convolutions with a bias + residual + ReLU epilogue).
The stock twin (`stock=True`) is plain torch.nn, written as torchvision writes it (classes BasicBlock /
Bottleneck, so `dlcore.patch` recognises it as it would torchvision's).

`small_input=True` swaps the 7×7/2 stem and max-pool for a 3×3/1 stem (for 8×8 – 32×32 images, e.g. digits).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlcore import blocks, patching, registry
from dlcore.models._training import dataclass_arguments, int_option
from dlcore.models._vision import ClassifierTrainConfig, classifier_run


# ------------------------------------------------------------------------------------- stock twin (torchvision)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = blocks.conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = blocks.conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = blocks.conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = blocks.conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = blocks.conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# ---------------------------------------------------------------------------------------------------- the network
ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
         "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
         "resnet152": ("bottleneck", (3, 8, 36, 3))}


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout: conv1, bn1, relu, maxpool, layer1-4, avgpool, fc. `width` (64 in
    torchvision) is layer1's channel count, doubled at each later stage (narrow encoders for CPU runs)."""

    def __init__(self, block: str, layers, num_classes: int = 1000, zero_init_residual: bool = False,
                 in_channels: int = 3, small_input: bool = False, stock: bool = False, width: int = 64):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        self.stock = stock
        cls = {("basic", True): BasicBlock, ("bottleneck", True): Bottleneck,
               ("basic", False): blocks.BasicBlock, ("bottleneck", False): blocks.Bottleneck}[(block, stock)]
        norm = nn.BatchNorm2d if stock else blocks.BatchNorm2d
        self.inplanes = width
        self.conv1 = (nn.Conv2d(in_channels, width, 3, 1, 1, bias=False) if small_input else
                      nn.Conv2d(in_channels, width, 7, 2, 3, bias=False))
        # dlcore: the stem's BN and ReLU are one fused op (relu is then the identity); same state_dict keys
        self.bn1 = nn.BatchNorm2d(width) if stock else blocks.BatchNorm2dReLU(width)
        self.relu = nn.ReLU(inplace=True) if stock else nn.Identity()
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(cls, norm, width, layers[0])
        self.layer2 = self._make_layer(cls, norm, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(cls, norm, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(cls, norm, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * cls.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block's last BN starts at 0: the block starts as the identity
            for m in self.modules():
                if isinstance(m, (Bottleneck, blocks.Bottleneck)):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, (BasicBlock, blocks.BasicBlock)):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, cls, norm, planes: int, count: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * cls.expansion:
            downsample = nn.Sequential(blocks.conv1x1(self.inplanes, planes * cls.expansion, stride),
                                       norm(planes * cls.expansion))
        layers = [cls(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * cls.expansion
        layers += [cls(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation [N, 8·width·expansion] (SimCLR's encoder output)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _builder(name: str):
    block, layers = ARCHS[name]

    def build(num_classes: int = 1000, stock: bool = False, **kwargs) -> ResNet:
        return ResNet(block, layers, num_classes, stock=stock, **kwargs)

    build.__name__ = name
    build.__doc__ = (f"{name} ({block} blocks {layers}); stock=True for the plain-torch twin. Keyword arguments: "
                     f"num_classes, zero_init_residual, in_channels, small_input, width.")
    return build


resnet18, resnet34, resnet50, resnet101, resnet152 = (_builder(n) for n in ARCHS)


def twin_of(model: ResNet) -> ResNet:
    """The other twin (stock ↔ dlcore) of `model`'s architecture, holding a copy of its state_dict."""
    block = "bottleneck" if isinstance(model.layer1[0], (Bottleneck, blocks.Bottleneck)) else "basic"
    layers = tuple(len(getattr(model, f"layer{k}")) for k in range(1, 5))
    twin = ResNet(block, layers, model.fc.out_features, in_channels=model.conv1.in_channels,
                  small_input=isinstance(model.maxpool, nn.Identity), stock=not model.stock,
                  width=model.conv1.out_channels)
    reference = next(model.parameters())
    twin = twin.to(reference.device, reference.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


class WithLoss(nn.Module):
    """model(x, labels) → cross-entropy loss: the shape of a training step the profilers and benchmarks time."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), labels)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class ResNetTrainConfig(ClassifierTrainConfig):
    """`dlcore train resnet`: a small-input ResNet classifier on offline images (digits or an ImageFolder path)."""
    arch: str = "resnet18"
    out: str = "runs/resnet"


def build_for_training(cfg: ResNetTrainConfig, num_classes: int) -> ResNet:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {cfg.arch!r}")
    return globals()[cfg.arch](num_classes=num_classes, stock=cfg.stock, in_channels=cfg.channels, small_input=True)


registry.register("train", "resnet", help="a ResNet classifier on digits (or an ImageFolder path)",
                  run=classifier_run(ResNetTrainConfig, build_for_training, lambda cfg: cfg.arch))(
    dataclass_arguments(ResNetTrainConfig))


# ---------------------------------------------------------------------------------------------------- profiling
def profile(arch: str = "resnet18", batch: int = 8, image_size: int = 224, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None, channels_last: bool = True) -> list[dict]:
    """Training images/s (forward, cross-entropy, backward, AdamW step) and peak memory, dlcore vs its stock twin
    (and the torch.compile'd twin), same run: dlcore.models._training.profile_training; then inference images/s
    (no_grad) of dlcore.fuse_for_inference(model) — and, on the CPU, of its opt-in Winograd form — against the
    stock twin in eval mode, in interleaved rounds."""
    import copy

    from dlcore import blocks
    from dlcore.models._training import EAGER_INFERENCE, profile_inference, profile_training

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    twin = globals()[arch](stock=True).to(dev).to(memory_format=fmt)
    ours = twin_of(twin).to(memory_format=fmt)
    x = torch.randn(batch, 3, image_size, image_size, device=dev).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=dev)
    rows = profile_training(WithLoss(ours), WithLoss(twin), (x, labels), batch, dev, steps, autocast, compile_stock)

    models = {"dlcore inference (BN folded)": patching.fuse_for_inference(copy.deepcopy(ours))}
    if dev.type == "cpu" and not autocast:
        models["dlcore inference (BN folded, Winograd opt-in)"] = patching.fuse_for_inference(copy.deepcopy(ours),
                                                                                           winograd=True)
    models[EAGER_INFERENCE] = twin.eval()
    rows += profile_inference(models, x, batch, dev, steps, autocast)
    twin.train()
    return rows


def _profile_arguments_for(default_batch: int):
    def add(p: argparse.ArgumentParser) -> None:
        from dlcore.models._training import add_profile_arguments

        p.add_argument("--image-size", type=int_option("image_size"), default=224)
        p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
        add_profile_arguments(p, batch=default_batch)
    return add


def _profile_run_for(arch: str):
    def run(args: argparse.Namespace) -> int:
        from dlcore.models._training import print_profile

        rows = profile(arch, args.batch, args.image_size, args.steps, args.autocast, args.compile, args.device,
                       args.channels_last)
        print_profile(f"{arch}: batch {args.batch} × {args.image_size}², "
                      f"{'channels_last' if args.channels_last else 'NCHW'}, "
                      f"{'bf16 autocast' if args.autocast else 'fp32'}, training step with AdamW, then inference "
                      "('tokens/s' = images/s; peak MiB for training only)", rows)
        return 0
    return run


for _arch, _batch in (("resnet18", 8), ("resnet50", 8)):
    registry.register("profile", _arch, help=f"{_arch} training (with peak memory) and inference images/s, dlcore "
                      "vs stock",
                      run=_profile_run_for(_arch))(_profile_arguments_for(_batch))
