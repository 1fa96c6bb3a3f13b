"""SimCLR (Chen et al. 2020) on dlcore: a ResNet encoder (models/resnet.py, the pooled features), a projection MLP
(Linear → BN → ReLU → Linear) and the NT-Xent loss between two augmented views of each image.

dlcore path (default): the encoder's fused blocks, the projection's BN + ReLU as one op (dlcore.nn.BatchNorm1dReLU,
an nn.Identity in the ReLU's slot keeps the stock state_dict keys), and the fused NT-Xent loss
(dlcore.functional.nt_xent_loss: the 2N×2N similarity matrix is never stored). The stock twin computes the loss as
SimCLR's reference code does: cross-entropy over the full similarity matrix with the diagonal masked.

Augmentations are batched tensor ops (no per-image Python): a random resized crop with a small rotation (one
affine_grid + grid_sample), brightness/contrast jitter and Gaussian noise.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dlcore import blocks, registry
from dlcore.models._training import dataclass_arguments, int_option, write_summary
from dlcore.models import resnet
from dlcore.ops.nt_xent import nt_xent_loss


def stock_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent as SimCLR's reference code computes it: the full 2N×2N matrix, diagonal masked, cross-entropy."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = (z @ z.t() / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                                   float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLR(nn.Module):
    """encoder (a ResNet's pooled features) + projection MLP; forward(x1, x2) → the NT-Xent loss of the two views."""

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, small_input: bool = False, width: int = 64,
                 projection_dim: int = 128, temperature: float = 0.5, stock: bool = False):
        super().__init__()
        self.encoder = getattr(resnet, arch)(num_classes=1, stock=stock, in_channels=in_channels,
                                             small_input=small_input, width=width)
        self.encoder.fc = nn.Identity()  # the representation is the pooled feature vector
        features = 8 * width * self.encoder.layer1[0].expansion
        bn_relu = [nn.BatchNorm1d(features), nn.ReLU(inplace=True)] if stock else \
            [blocks.BatchNorm1dReLU(features), nn.Identity()]
        self.projection = nn.Sequential(nn.Linear(features, features, bias=False), *bn_relu,
                                        nn.Linear(features, projection_dim))
        self.temperature, self.stock = temperature, stock
        self.features = features

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z = self.projection(self.represent(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        return (stock_nt_xent if self.stock else nt_xent_loss)(z1, z2, self.temperature)


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float = 0.6, max_degrees: float = 15.0,
            jitter: float = 0.3, noise: float = 0.05) -> torch.Tensor:
    """A random view of each image in [0, 1]: resized crop (area scale in [min_scale, 1], random position) with a
    rotation of up to ±max_degrees, brightness/contrast jitter, Gaussian noise."""
    n = x.shape[0]

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)

    scale = uniform(min_scale, 1.0).sqrt()  # side of the crop, as a fraction of the image
    angle = uniform(-max_degrees, max_degrees) * math.pi / 180
    shift = uniform(-1.0, 1.0, 2) * (1 - scale)[:, None]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    brightness = uniform(-jitter, jitter)[:, None, None, None] * 0.5
    contrast = uniform(1 - jitter, 1 + jitter)[:, None, None, None]
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    out = out + noise * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


@torch.no_grad()
def encode(model: SimCLR, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model.represent(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 classes: int, steps: int = 300, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression (L-BFGS, weight decay 1e-4) on standardised frozen
    features: the standard linear evaluation of a representation."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    a, b = (train_f - mean) / std, (test_f - mean) / std
    torch.manual_seed(seed)
    probe = nn.Linear(a.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(a), train_y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (probe(b).argmax(1) == test_y).float().mean().item()


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class SimCLRTrainConfig:
    """`dlcore train simclr`: contrastive pre-training on unlabeled images, then a linear probe on the labels,
    against the same probe on a randomly initialised encoder."""
    data: str = "digits"
    image_size: int = 16
    channels: int = 1
    arch: str = "resnet18"
    width: int = 16
    projection_dim: int = 64
    temperature: float = 0.5
    epochs: int = 15
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-6
    # the probe's labels: k per class (the low-label regime of SimCLR's semi-supervised evaluation; on digits the
    # 8×8 pixels are nearly linearly separable, so with every label a random encoder's probe already reaches ~97%
    # and both probes are reported); 0: every training label
    probe_labels_per_class: int = 5
    seed: int = 0
    stock: bool = False
    out: str = "runs/simclr"
    resume: bool = False
    progress: bool = True


def _probe_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    if per_class <= 0:
        return torch.arange(len(y))
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(y == c)[:, 0] for c in y.unique()]
    return torch.cat([p[torch.randperm(len(p), generator=gen)[:per_class]] for p in picks])


def train(cfg: SimCLRTrainConfig) -> dict:
    """Pre-train on the training images (labels unused), probe linearly; writes loss.csv, loss.png, checkpoint.pt
    (resume=True continues) and summary.json (probe accuracies, trained and random) to cfg.out. Under torchrun each
    rank trains a DistributedDataParallel replica on its share of every batch (the loss's negatives are the rank's
    own views)."""
    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves, warmup_cosine
    from dlcore.models._vision import Checkpoint, Distributed, load_images

    dist = Distributed()
    data = load_images(cfg.data, cfg.image_size, seed=cfg.seed, channels=cfg.channels)

    def build():
        return SimCLR(cfg.arch, cfg.channels, small_input=True, width=cfg.width, projection_dim=cfg.projection_dim,
                      temperature=cfg.temperature, stock=cfg.stock)

    torch.manual_seed(cfg.seed)
    model = build()
    torch.manual_seed(cfg.seed)
    untrained = build()  # the same initial weights, never trained: the baseline of the probe
    net = dist.wrap(model)
    opt = (torch.optim.AdamW if cfg.stock else dlcore.optim.AdamW)(model.parameters(), lr=cfg.lr,
                                                                  weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(data.train_y) // cfg.batch)
    total = cfg.epochs * steps_per_epoch
    schedule = warmup_cosine(opt, total, 0.1)
    ckpt = Checkpoint(cfg.out, cfg.resume, model=model, optimizer=opt, schedule=schedule)
    history, start = ckpt.restore()
    progress = Progress("simclr", cfg.progress and dist.rank == 0, total, start * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(data.train_y), generator=gen)
        total_loss = 0.0
        for k in range(steps_per_epoch):
            x = data.train_x[dist.shard(order[k * cfg.batch:(k + 1) * cfg.batch])]
            loss = net(augment(x, gen), augment(x, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total_loss += loss.item()
            progress.advance(epoch * steps_per_epoch + k + 1, f"loss {loss.item():.3f}")
        if dist.rank == 0:
            history.append((epoch + 1, total_loss / steps_per_epoch))
            progress.note(f"epoch {epoch + 1}: NT-Xent {history[-1][1]:.4f}")
            ckpt.save(history, epoch + 1, cfg)
    progress.close()
    agree = dist.replicas_agree(model)
    if dist.rank != 0:
        return {"history": history, "replicas_agree": agree, "world_size": dist.world}
    subset = _probe_subset(data.train_y, cfg.probe_labels_per_class, cfg.seed)
    probes, probes_all = {}, {}
    for name, m in (("trained", model), ("random", untrained)):
        train_f, test_f = encode(m, data.train_x), encode(m, data.test_x)
        probes[name] = linear_probe(train_f[subset], data.train_y[subset], test_f, data.test_y, len(data.classes),
                                    seed=cfg.seed)
        probes_all[name] = linear_probe(train_f, data.train_y, test_f, data.test_y, len(data.classes),
                                        seed=cfg.seed)
    with open(os.path.join(cfg.out, "loss.csv"), "w") as f:
        f.write("epoch,nt_xent\n" + "".join(f"{e},{v:.5f}\n" for e, v in history))
    if history:
        plot_curves(os.path.join(cfg.out, "loss.png"), {"NT-Xent": ([h[0] for h in history],
                                                                    [h[1] for h in history])},
                    "epoch", "loss", f"SimCLR ({cfg.arch}, width {cfg.width}) on {cfg.data}")
    summary = {"history": history, "probe_accuracy": probes, "probe_gain": probes["trained"] - probes["random"],
               "probe_labels": int(len(subset)), "probe_accuracy_all_labels": probes_all,
               "seconds": time.perf_counter() - t0, "world_size": dist.world,
               "replicas_agree": agree, "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _train_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import dataclass_from_args

    cfg = dataclass_from_args(SimCLRTrainConfig, args)
    summary = train(cfg)
    if "probe_accuracy" not in summary:
        return 0 if summary["replicas_agree"] else 1
    acc, full = summary["probe_accuracy"], summary["probe_accuracy_all_labels"]
    print(f"linear probe with every label: trained encoder {full['trained']:.4f}, random encoder {full['random']:.4f}")
    print(f"linear probe ({summary['probe_labels']} labels): trained encoder {acc['trained']:.4f}, random encoder "
          f"{acc['random']:.4f} (+{100 * summary['probe_gain']:.1f} points) after {cfg.epochs} epochs "
          f"({summary['seconds']:.0f} s); wrote {cfg.out}/loss.csv, loss.png, checkpoint.pt, summary.json")
    return 0 if summary["probe_gain"] >= 0.10 and summary["replicas_agree"] else 1


registry.register("train", "simclr", help="SimCLR pre-training on digits (or an ImageFolder path) + linear probe",
                  run=_train_run)(dataclass_arguments(SimCLRTrainConfig))


# ---------------------------------------------------------------------------------------------------- profiling
def profile(batch: int = 64, image_size: int = 32, width: int = 64, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None) -> list[dict]:
    """Training images/s (two views, encoder + projection + NT-Xent, AdamW) and peak memory, dlcore vs stock."""
    from dlcore.models._training import profile_training

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    ours = SimCLR(small_input=True, width=width).to(dev)
    twin = SimCLR(small_input=True, width=width, stock=True).to(dev)
    twin.load_state_dict(ours.state_dict())
    x1, x2 = (torch.rand(batch, 3, image_size, image_size, device=dev) for _ in range(2))
    return profile_training(ours, twin, (x1, x2), batch, dev, steps, autocast, compile_stock)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--image-size", type=int_option("image_size"), default=32)
    p.add_argument("--width", type=int_option("width"), default=64, help="the ResNet-18 encoder's first-stage channels")
    add_profile_arguments(p, batch=64)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.batch, args.image_size, args.width, args.steps, args.autocast, args.compile, args.device)
    print_profile(f"SimCLR ResNet-18 (width {args.width}) {args.image_size}² RGB: batch {args.batch} × 2 views, "
                  "training step with AdamW ('tokens/s' = images/s)", rows)
    return 0


registry.register("profile", "simclr", help="SimCLR training images/s and peak memory, dlcore vs stock",
                  run=_profile_run)(_profile_arguments)
