"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) on dlcore: torchvision's layout (64/192/384/256/256 channels; its
state_dicts load unchanged) or the paper's 96/256/384/384/256 (local response normalisation omitted, as
torchvision does).

dlcore path (default): conv1, conv2 and conv5 with their ReLU and overlapping 3×3/2 max pools are each one
dlcore.nn.Conv2dReLUMaxPool2d; conv3 and conv4 dlcore.nn.Conv2dReLU. The slots of the fused ReLUs and pools in the
Sequential hold nn.Identity, so the indices — and the state_dict keys (features.0.weight, features.3.weight, …,
classifier.1.weight) — are torchvision's. The classifier is dlcore.nn.Dropout, then Linear + ReLU + Dropout as one
fused bias/ReLU/Philox-dropout pass after the matmul (dlcore.nn.LinearReLUDropout; the mask is regenerated in
backward, never stored), then Linear + ReLU, then dlcore.nn.Linear (the skinny CPU GEMM at few rows). Dropout
masks differ from the stock twin's (Philox vs torch's generator): the twins agree exactly in eval mode or with
dropout=0.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dlcore import registry
from dlcore.models._training import dataclass_arguments, int_option
from dlcore.models._vision import ClassifierTrainConfig, classifier_run
from dlcore.nn import Conv2dReLU, Conv2dReLUMaxPool2d, Dropout, Linear, LinearReLUDropout
from dlcore.ops.batch_norm import as_layout

LAYOUTS = {"torchvision": (64, 192, 384, 256, 256), "paper": (96, 256, 384, 384, 256)}
# (kernel, stride, padding, pooled after) of conv1..conv5
CONVS = ((11, 4, 2, True), (5, 1, 2, True), (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, True))


class AlexNet(nn.Module):
    """features → AdaptiveAvgPool2d(6×6) → classifier (Dropout, Linear 4096, ReLU, Dropout, Linear 4096, ReLU,
    Linear num_classes), torchvision's module tree."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, layout: str = "torchvision",
                 in_channels: int = 3, stock: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
        widths = (in_channels, *LAYOUTS[layout])
        layers: list[nn.Module] = []
        for (k, s, p, pooled), cin, cout in zip(CONVS, widths, widths[1:]):
            if stock:
                layers += [nn.Conv2d(cin, cout, k, s, p), nn.ReLU(inplace=True)]
                layers += [nn.MaxPool2d(3, 2)] if pooled else []
            elif pooled:
                layers += [Conv2dReLUMaxPool2d(cin, cout, k, s, p, pool_kernel_size=3, pool_stride=2), nn.Identity(),
                           nn.Identity()]
            else:
                layers += [Conv2dReLU(cin, cout, k, s, p), nn.Identity()]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        if stock:
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1] * 36, 4096),
                                            nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(4096, 4096),
                                            nn.ReLU(inplace=True), nn.Linear(4096, num_classes))
        else:  # Dropout; Linear + ReLU + Dropout fused; Linear + ReLU fused; Linear — torchvision's indices
            self.classifier = nn.Sequential(Dropout(dropout), LinearReLUDropout(widths[-1] * 36, 4096, p=dropout),
                                            nn.Identity(), nn.Identity(), LinearReLUDropout(4096, 4096, p=0.0),
                                            nn.Identity(), Linear(4096, num_classes))
        self.stock = stock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.stock and x.device.type == "cpu" and x.dim() == 4:
            # The CPU convolutions compute channels-last whatever they are given, and each returns its input's
            # layout: an NCHW batch would be converted in and out at every layer. Once here instead (B16 224²,
            # AMD VM, one process: inference 130.7 -> 124.5 ms, training fwd+bwd 447.6 -> 413.7 ms).
            x = as_layout(x, True)  # (the C++ transpose: torch's copy of [16, 3, 224, 224] is ~2x slower)
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet(num_classes: int = 1000, stock: bool = False, **kwargs) -> AlexNet:
    """AlexNet; stock=True for the plain-torch twin. Keyword arguments: dropout, layout ("torchvision" | "paper"),
    in_channels."""
    return AlexNet(num_classes, stock=stock, **kwargs)


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class AlexNetTrainConfig(ClassifierTrainConfig):
    """`dlcore train alexnet`: AlexNet on digits upscaled to 64×64 (or an ImageFolder path)."""
    image_size: int = 64
    layout: str = "torchvision"
    dropout: float = 0.5
    epochs: int = 12
    lr: float = 2e-4
    out: str = "runs/alexnet"


def build_for_training(cfg: AlexNetTrainConfig, num_classes: int) -> AlexNet:
    return AlexNet(num_classes, cfg.dropout, cfg.layout, cfg.channels, stock=cfg.stock)


registry.register("train", "alexnet", help="AlexNet on digits upscaled to 64×64 (or an ImageFolder path)",
                  run=classifier_run(AlexNetTrainConfig, build_for_training, lambda cfg: f"alexnet ({cfg.layout})"))(
    dataclass_arguments(AlexNetTrainConfig))


# ---------------------------------------------------------------------------------------------------- profiling
def profile(batch: int = 16, image_size: int = 224, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None, top: int = 8) -> list[dict]:
    """Training-step images/s and peak memory (dlcore.models._training.profile_training), then inference
    images/s, dlcore vs its stock twin, same run; prints torch.profiler's top kernels of one dlcore step."""
    import torch.nn.functional as F

    from dlcore.models._training import EAGER_INFERENCE, profile_inference, profile_training
    from dlcore.models.resnet import WithLoss

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    ours, twin = AlexNet().to(dev), AlexNet(stock=True).to(dev)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 3, image_size, image_size, device=dev)
    labels = torch.randint(0, 1000, (batch,), device=dev)
    rows = profile_training(WithLoss(ours), WithLoss(twin), (x, labels), batch, dev, steps, autocast, compile_stock)

    rows += profile_inference({"dlcore inference": ours.eval(), EAGER_INFERENCE: twin.eval()}, x, batch, dev, steps)
    ours.train()
    ours.zero_grad(set_to_none=True)  # as in a training step: the gradients are written, not accumulated
    with torch.profiler.profile() as prof:
        F.cross_entropy(ours(x), labels).backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total" if dev.type == "cpu" else "self_cuda_time_total",
                                    row_limit=top))
    return rows


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--image-size", type=int_option("image_size"), default=224)
    p.add_argument("--top", type=int_option("top"), default=8, help="rows of torch.profiler's kernel table")
    add_profile_arguments(p, batch=16)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.batch, args.image_size, args.steps, args.autocast, args.compile, args.device, args.top)
    print_profile(f"AlexNet (torchvision layout) batch {args.batch} × {args.image_size}², "
                  f"{'bf16 autocast' if args.autocast else 'fp32'}: training step with AdamW, then inference "
                  "('tokens/s' = images/s; peak MiB for training only)", rows)
    return 0


registry.register("profile", "alexnet", help="AlexNet training and inference images/s, dlcore vs stock, top kernels",
                  run=_profile_run)(_profile_arguments)
