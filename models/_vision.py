"""What the image models' `dlcore train` entries share (resnet, dcgan, simclr): offline data (scikit-learn's 8×8
digits, or an ImageFolder-style directory of class subfolders), torchrun/DistributedDataParallel set-up, checkpoints
with resume, and a PNG grid of images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass
class ImageData:
    train_x: torch.Tensor  # [N, C, S, S] float32 in [0, 1]
    train_y: torch.Tensor  # [N] int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list


def load_images(data: str = "digits", image_size: int = 16, test_fraction: float = 0.2, seed: int = 0,
                channels: int = 1) -> ImageData:
    """`data` = "digits" (scikit-learn's 1797 8×8 handwritten digits, offline) or a directory root/<class>/<image>
    (any format Pillow reads). Images are resized to image_size² (bilinear), scaled to [0, 1], with `channels`
    channels (1: grayscale, 3: RGB); a seeded split holds out `test_fraction` of them."""
    if data == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("the digits data comes from scikit-learn: pip install scikit-learn") from exc
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        classes = [str(c) for c in range(10)]
        x = x.expand(-1, channels, -1, -1).contiguous()
    else:
        x, y, classes = _image_folder(data, channels)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(test_fraction * len(y))))
    test, train = order[:n_test], order[n_test:]
    return ImageData(x[train], y[train], x[test], y[test], classes)


def _image_folder(root: str, channels: int):
    from PIL import Image

    if not os.path.isdir(root):
        raise FileNotFoundError(f"data must be 'digits' or a directory of class folders; {root!r} is neither")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root!r} has no class subfolders (expected root/<class>/<image>)")
    images, labels, size = [], [], None
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if not file.lower().endswith(IMAGE_SUFFIXES):
                continue
            with Image.open(os.path.join(root, name, file)) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                size = size or img.size
                img = img.resize(size)  # one size for stacking; load_images then resizes to image_size
                t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255.0
                images.append(t.view(size[1], size[0], channels).permute(2, 0, 1))
                labels.append(label)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root!r}")
    return torch.stack(images), torch.tensor(labels), classes


class Distributed:
    """torchrun's world (gloo on the CPU, nccl on GPUs), or a world of one."""

    def __init__(self):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model

    def shard(self, batch_indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (every rank sees a different part of the same batch)."""
        return batch_indices[self.rank::self.world]

    def replicas_agree(self, model: torch.nn.Module) -> bool:
        if self.world == 1:
            return True
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], g) for g in gathered)


class Checkpoint:
    """out/checkpoint.pt holding the state_dict of each named object (models, optimizers, schedules), the history,
    the number of epochs done and the config. restore() loads them back when resuming and one exists."""

    def __init__(self, out: str, resume: bool, **objects):
        os.makedirs(out, exist_ok=True)
        self.path, self.resume, self.objects = os.path.join(out, "checkpoint.pt"), resume, objects

    def restore(self) -> tuple[list, int]:
        """(history, epochs done): ([], 0) for a fresh run."""
        if not (self.resume and os.path.exists(self.path)):
            return [], 0
        state = torch.load(self.path, weights_only=False)
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        return state["history"], state["epoch"]

    def save(self, history: list, epoch: int, config) -> None:
        from dataclasses import asdict

        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state.update(history=history, epoch=epoch, config=asdict(config))
        tmp = self.path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a crash mid-write never destroys the previous checkpoint


def save_grid(path: str, images: torch.Tensor, nrow: int = 8, title: str = "") -> bool:
    """images [N, C, H, W] in [0, 1] → one PNG grid (matplotlib); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = images[i]
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(nrow * 0.6 + 0.5, rows * 0.6 + 0.6))
    ax.imshow(array, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- classifiers
def random_shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ±pixels in each direction (zero fill): a tensor augmentation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pixels)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return correct / len(y)


@dataclass
class ClassifierTrainConfig:
    """The options every `dlcore train <classifier>` takes (a model's config adds its own)."""
    data: str = "digits"
    image_size: int = 16
    channels: int = 1
    epochs: int = 6
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    stock: bool = False
    out: str = "runs/classifier"
    resume: bool = False
    progress: bool = True


def train_classifier(cfg: ClassifierTrainConfig, build, label: str) -> dict:
    """Train build(cfg, num_classes) with cross-entropy, AdamW (dlcore's, torch's for the stock twin), warm-up +
    cosine; writes accuracy.csv, accuracy.png, checkpoint.pt (resume=True continues) and summary.json to cfg.out.
    Under torchrun each process trains a DistributedDataParallel replica on its share of every batch; rank 0
    evaluates and writes."""
    import time
    from dataclasses import asdict

    import dlcore.optim
    from dlcore.models._training import Progress, plot_curves, warmup_cosine, write_summary

    dist = Distributed()
    data = load_images(cfg.data, cfg.image_size, seed=cfg.seed, channels=cfg.channels)
    torch.manual_seed(cfg.seed)  # same weights on every rank
    model = build(cfg, len(data.classes))
    net = dist.wrap(model)
    opt = (torch.optim.AdamW if cfg.stock else dlcore.optim.AdamW)(model.parameters(), lr=cfg.lr,
                                                                  weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(data.train_y) + cfg.batch - 1) // cfg.batch
    total = cfg.epochs * steps_per_epoch
    schedule = warmup_cosine(opt, total, 0.15)
    ckpt = Checkpoint(cfg.out, cfg.resume, model=model, optimizer=opt, schedule=schedule)
    history, start = ckpt.restore()
    progress = Progress(label, cfg.progress and dist.rank == 0, total, start * steps_per_epoch)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for epoch in range(start, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # same order on every rank, resumable
        order = torch.randperm(len(data.train_y), generator=gen)
        model.train()
        for k in range(steps_per_epoch):
            idx = dist.shard(order[k * cfg.batch:(k + 1) * cfg.batch])
            if len(idx) < 2:  # batch norm needs two values per channel
                continue
            x = data.train_x[idx]
            if cfg.augment:
                x = random_shift(x, max(1, cfg.image_size // 8), gen)
            loss = F.cross_entropy(net(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            progress.advance(epoch * steps_per_epoch + k + 1, f"loss {loss.item():.3f}")
        if dist.rank == 0:
            acc = accuracy(model, data.test_x, data.test_y)
            history.append((epoch + 1, loss.item(), acc))
            progress.note(f"epoch {epoch + 1}: train loss {loss.item():.3f}, test accuracy {acc:.4f}")
            ckpt.save(history, epoch + 1, cfg)
    progress.close()
    agree = dist.replicas_agree(model)
    if dist.rank != 0:
        return {"history": history, "replicas_agree": agree, "world_size": dist.world}
    with open(os.path.join(cfg.out, "accuracy.csv"), "w") as f:
        f.write("epoch,train_loss,test_accuracy\n" + "".join(f"{e},{l:.5f},{a:.5f}\n" for e, l, a in history))
    if history:
        plot_curves(os.path.join(cfg.out, "accuracy.png"), {"test accuracy": ([h[0] for h in history],
                                                                              [h[2] for h in history])},
                    "epoch", "accuracy", f"{label} on {cfg.data}")
    summary = {"history": history, "test_accuracy": history[-1][2] if history else None,
               "seconds": time.perf_counter() - t0, "world_size": dist.world, "replicas_agree": agree,
               "config": asdict(cfg)}
    write_summary(cfg.out, summary)
    return summary


def classifier_run(config_cls, build, label_of, target: float = 0.95):
    """`run` for registry.register: train, print, exit 0 when the test accuracy reaches `target`."""
    def run(args) -> int:
        from dlcore.models._training import dataclass_from_args

        cfg = dataclass_from_args(config_cls, args)
        label = label_of(cfg)
        summary = train_classifier(cfg, build, label)
        if summary.get("test_accuracy") is None:  # a torchrun worker other than rank 0
            return 0 if summary["replicas_agree"] else 1
        print(f"{label} test accuracy {summary['test_accuracy']:.4f} after {cfg.epochs} epochs "
              f"({summary['seconds']:.0f} s); wrote {cfg.out}/accuracy.csv, accuracy.png, checkpoint.pt, "
              "summary.json")
        return 0 if summary["test_accuracy"] >= target and summary["replicas_agree"] else 1
    return run
