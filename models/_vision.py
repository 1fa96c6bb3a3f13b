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
    """out/checkpoint.pt: whatever state dict the trainer hands over, plus the epoch; load() returns it or None."""

    def __init__(self, out: str, resume: bool):
        os.makedirs(out, exist_ok=True)
        self.path, self.resume = os.path.join(out, "checkpoint.pt"), resume

    def load(self) -> Optional[dict]:
        if self.resume and os.path.exists(self.path):
            return torch.load(self.path, weights_only=False)
        return None

    def save(self, state: dict) -> None:
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
