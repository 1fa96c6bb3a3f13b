"""DCGAN (Radford et al. 2015) on dlcore: the paper's generator (transposed convolutions, batch norm, ReLU, tanh out)
and discriminator (strided convolutions, batch norm, LeakyReLU 0.2, no BN on its input layer), for square images of
4·2^k pixels (64×64 in the paper, 16×16 for the digits).

dlcore path (default): every BN + ReLU of the generator and BN + LeakyReLU of the discriminator is one fused op
(dlcore.nn.BatchNorm2dReLU / BatchNorm2dLeakyReLU); the activation's slot in the Sequential holds nn.Identity, so
the state_dict keys (main.0.weight, main.1.running_mean, …) are the stock twin's, which is the PyTorch DCGAN
example's layout.
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


def _levels(image_size: int) -> int:
    k = int(round(math.log2(image_size))) - 2
    if image_size < 8 or 4 * 2 ** k != image_size:
        raise ValueError(f"image_size must be 4·2^k ≥ 8 (8, 16, 32, 64, …), got {image_size}")
    return k


def _norm_act(channels: int, act: str, stock: bool) -> list[nn.Module]:
    """[BN, activation] — or, for dlcore, [fused BN+activation, Identity] (same indices, same state_dict keys)."""
    if stock:
        return [nn.BatchNorm2d(channels), nn.ReLU(True) if act == "relu" else nn.LeakyReLU(0.2, inplace=True)]
    fused = blocks.BatchNorm2dReLU(channels) if act == "relu" else blocks.BatchNorm2dLeakyReLU(channels,
                                                                                             negative_slope=0.2)
    return [fused, nn.Identity()]


def _init(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02), BN weights N(1, 0.02), BN biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    """z [N, nz] or [N, nz, 1, 1] → images [N, nc, image_size, image_size] in (-1, 1)."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64, stock: bool = False):
        super().__init__()
        k = _levels(image_size)
        widths = [ngf * 2 ** (k - 1 - i) for i in range(k)]  # 64×64: 8·ngf, 4·ngf, 2·ngf, ngf
        layers = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), *_norm_act(widths[0], "relu", stock)]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), *_norm_act(cout, "relu", stock)]
        layers += [nn.ConvTranspose2d(widths[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.nz = nz
        self.main = nn.Sequential(*layers)
        _init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """images [N, nc, S, S] → logits [N] (real > 0); the paper's sigmoid is folded into the loss."""

    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64, stock: bool = False):
        super().__init__()
        k = _levels(image_size)
        widths = [ndf * 2 ** i for i in range(k)]  # 64×64: ndf, 2·ndf, 4·ndf, 8·ndf
        layers = [nn.Conv2d(nc, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False), *_norm_act(cout, "leaky_relu", stock)]
        layers += [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


class GANStep(nn.Module):
    """One training step's loss for profiling: the discriminator's loss on a real and a generated batch plus the
    generator's non-saturating loss (both networks' parameters get gradients)."""

    def __init__(self, generator: Generator, discriminator: Discriminator):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator

    def forward(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        fake = self.generator(z)
        d_real, d_fake = self.discriminator(real), self.discriminator(fake)
        ones, zeros = torch.ones_like(d_real), torch.zeros_like(d_fake)
        return (F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_fake, zeros)
                + F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake)))


# ---------------------------------------------------------------------------------------------------- training
@dataclass
class DCGANTrainConfig:
    """`dlcore train dcgan`: the paper's recipe (Adam lr 2e-4, β1 0.5, batch 64) on offline images."""
    data: str = "digits"
    image_size: int = 16
    channels: int = 1
    nz: int = 32
    ngf: int = 32
    ndf: int = 32
    epochs: int = 30
    batch: int = 64
    lr: float = 2e-4
    seed: int = 0
    stock: bool = False
    out: str = "runs/dcgan"
    resume: bool = False
    progress: bool = True


def train(cfg: DCGANTrainConfig) -> dict:
    """Alternate D and G steps (non-saturating G loss); writes samples_epochNNN.png (a fixed-noise grid) each epoch,
    losses.csv, losses.png, checkpoint.pt (resume=True continues) and summary.json to cfg.out. Under torchrun both
    networks are DistributedDataParallel replicas, each rank on its share of every batch."""
    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves
    from dlcore.models._vision import Checkpoint, Distributed, load_images, save_grid

    dist = Distributed()
    data = load_images(cfg.data, cfg.image_size, seed=cfg.seed, channels=cfg.channels)
    images = torch.cat([data.train_x, data.test_x]) * 2 - 1  # unsupervised: every image, scaled to [-1, 1]
    torch.manual_seed(cfg.seed)
    gen_net = Generator(cfg.nz, cfg.ngf, cfg.channels, cfg.image_size, stock=cfg.stock)
    disc_net = Discriminator(cfg.ndf, cfg.channels, cfg.image_size, stock=cfg.stock)
    g, d = dist.wrap(gen_net), dist.wrap(disc_net)
    adam = torch.optim.Adam if cfg.stock else dlcore.optim.Adam
    opt_g = adam(gen_net.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = adam(disc_net.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    fixed_noise = torch.randn(64, cfg.nz, generator=torch.Generator().manual_seed(cfg.seed + 1))
    ckpt = Checkpoint(cfg.out, cfg.resume, generator=gen_net, discriminator=disc_net, opt_g=opt_g, opt_d=opt_d)
    history, start = ckpt.restore()
    steps_per_epoch = len(images) // cfg.batch
    progress = Progress("dcgan", cfg.progress and dist.rank == 0, cfg.epochs * steps_per_epoch,
                        start * steps_per_epoch)
    grids, t0 = [], time.perf_counter()
    for epoch in range(start, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(images), generator=gen)
        sums = [0.0, 0.0]
        for k in range(steps_per_epoch):
            real = images[dist.shard(order[k * cfg.batch:(k + 1) * cfg.batch])]
            z = torch.randn(len(real), cfg.nz, generator=gen)
            fake = g(z)
            # discriminator: real → 1, fake → 0 (the fake batch detached: G gets no gradient from this step)
            d_real, d_fake = d(real), d(fake.detach())
            loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                      + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # generator: make D call the fakes real (the non-saturating loss of the paper)
            d_fake = d(fake)
            loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            sums[0] += loss_d.item()
            sums[1] += loss_g.item()
            progress.advance(epoch * steps_per_epoch + k + 1, f"D {loss_d.item():.3f} G {loss_g.item():.3f}")
        if dist.rank == 0:
            history.append((epoch + 1, sums[0] / steps_per_epoch, sums[1] / steps_per_epoch))
            gen_net.eval()
            with torch.no_grad():
                samples = (gen_net(fixed_noise) + 1) / 2
            gen_net.train()
            path = os.path.join(cfg.out, f"samples_epoch{epoch + 1:03d}.png")
            if save_grid(path, samples.clamp(0, 1), title=f"DCGAN epoch {epoch + 1}"):
                grids.append(path)
            progress.note(f"epoch {epoch + 1}: D loss {history[-1][1]:.3f}, G loss {history[-1][2]:.3f}")
            ckpt.save(history, epoch + 1, cfg)
    progress.close()
    agree = dist.replicas_agree(gen_net) and dist.replicas_agree(disc_net)
    if dist.rank != 0:
        return {"history": history, "replicas_agree": agree, "world_size": dist.world}
    with open(os.path.join(cfg.out, "losses.csv"), "w") as f:
        f.write("epoch,loss_d,loss_g\n" + "".join(f"{e},{a:.5f},{b:.5f}\n" for e, a, b in history))
    if history:
        epochs = [h[0] for h in history]
        plot_curves(os.path.join(cfg.out, "losses.png"), {"discriminator": (epochs, [h[1] for h in history]),
                                                          "generator": (epochs, [h[2] for h in history])},
                    "epoch", "BCE loss", f"DCGAN on {cfg.data}")
    summary = {"history": history, "grids": grids, "seconds": time.perf_counter() - t0, "world_size": dist.world,
               "replicas_agree": agree, "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def _train_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import dataclass_from_args

    cfg = dataclass_from_args(DCGANTrainConfig, args)
    summary = train(cfg)
    if "grids" not in summary:
        return 0 if summary["replicas_agree"] else 1
    last = summary["history"][-1] if summary["history"] else None
    if last:
        print(f"DCGAN after {last[0]} epochs ({summary['seconds']:.0f} s): D loss {last[1]:.3f}, G loss {last[2]:.3f}")
    print(f"wrote {len(summary['grids'])} sample grids, losses.csv, losses.png, checkpoint.pt to {cfg.out}")
    finite = all(math.isfinite(v) for h in summary["history"] for v in h[1:])
    return 0 if finite and summary["replicas_agree"] else 1


registry.register("train", "dcgan", help="DCGAN on digits (or an ImageFolder path); a PNG grid per epoch",
                  run=_train_run)(dataclass_arguments(DCGANTrainConfig))


# ---------------------------------------------------------------------------------------------------- profiling
def profile(batch: int = 64, image_size: int = 64, steps: int = 3, autocast: bool = False,
            compile_stock: bool = False, device: Optional[str] = None) -> list[dict]:
    """Training images/s of one D+G step (the paper's 64×64 RGB networks) and peak memory, dlcore vs stock."""
    from dlcore.models._training import profile_training

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    ours = GANStep(Generator(image_size=image_size), Discriminator(image_size=image_size)).to(dev)
    twin = GANStep(Generator(image_size=image_size, stock=True), Discriminator(image_size=image_size, stock=True))
    twin = twin.to(dev)
    twin.load_state_dict(ours.state_dict())
    real = torch.rand(batch, 3, image_size, image_size, device=dev) * 2 - 1
    z = torch.randn(batch, 100, device=dev)
    return profile_training(ours, twin, (real, z), batch, dev, steps, autocast, compile_stock)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    from dlcore.models._training import add_profile_arguments

    p.add_argument("--image-size", type=int_option("image_size"), default=64)
    add_profile_arguments(p, batch=64)


def _profile_run(args: argparse.Namespace) -> int:
    from dlcore.models._training import print_profile

    rows = profile(args.batch, args.image_size, args.steps, args.autocast, args.compile, args.device)
    print_profile(f"DCGAN {args.image_size}×{args.image_size} RGB: batch {args.batch}, one D + G step with AdamW "
                  "('tokens/s' = images/s)", rows)
    return 0


registry.register("profile", "dcgan", help="DCGAN training images/s and peak memory, dlcore vs stock",
                  run=_profile_run)(_profile_arguments)
