"""Benchmark cases for dlcore.patch / dlcore.fuse_for_inference on models built from plain torch.nn modules (what a
user has before reaching for dlcore), against the same model unpatched, in the same run:
- AlexNet's torchvision module tree (dlcore.models.alexnet(stock=True)) patched: a training step (forward,
  cross-entropy, backward, torch's fused AdamW on both sides: the models are what is compared) and inference;
- a VGG-BN-style Sequential (six Conv2d → BatchNorm2d → ReLU, three max pools) through fuse_for_inference:
  inference;
- a 4-layer nn.TransformerEncoder (d 512, 8 heads, pre-LN) patched (LayerNorm and MultiheadAttention swapped):
  a training step.
No issue names a target for these: they show what the swap buys a model dlcore did not build. fp32 on the CPU,
bf16 autocast (training) / bf16 weights (inference) on a GPU."""
from __future__ import annotations

import copy

import torch
from torch import nn

from dlcore.bench.harness import DLCORE, Case


def _vgg_bn() -> nn.Sequential:
    layers, cin = [], 3
    for cout, pooled in ((64, False), (64, True), (128, False), (128, True), (256, False), (256, True)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if pooled else []
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256 * 16, 10))


class _PoolHead(nn.Module):
    """A classifier on an encoder's mean token: model(x, labels) → loss through WithLoss."""

    def __init__(self, encoder: nn.Module, width: int, classes: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(512, 8, 2048, dropout=0.1, batch_first=True, norm_first=True)
    return _PoolHead(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), 512, 10)


def _training_case(device: str, name: str, make_stock, make_batch, flops: float) -> Case:
    from dlcore.bench.gpt import train_step_setup
    from dlcore.models.resnet import WithLoss
    from dlcore.patching import patch

    def make_pair():
        stock = make_stock().to(device)
        return WithLoss(patch(copy.deepcopy(stock))), WithLoss(stock)

    def optimizer(params):  # the same on both sides: the case times the models
        return torch.optim.AdamW(params, lr=1e-4, fused=True)

    return Case("patch", name, device,
                train_step_setup(make_pair, make_batch, device, device != "cpu", False, optimizer),
                flops=flops, baseline="torch eager", quick=False)


def _inference_case(device: str, name: str, make_stock, transform, make_input, flops: float) -> Case:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    def setup(n_sets: int):
        torch.manual_seed(0)
        stock = make_stock().to(device, dtype).eval()
        ours = transform(copy.deepcopy(stock)).eval()
        sets = [make_input().to(device, dtype) for _ in range(n_sets)]
        state = {"i": 0}

        def variant(model):
            @torch.no_grad()
            def call():
                state["i"] += 1
                return model(sets[state["i"] % n_sets])
            return call

        return {DLCORE: variant(ours), "torch eager": variant(stock)}

    return Case("patch", name, device, setup, flops=flops, baseline="torch eager", quick=False)


def cases(device: str) -> list[Case]:
    from dlcore.models.alexnet import alexnet
    from dlcore.patching import fuse_for_inference, patch

    batch, image = 16, 224
    alexnet_flops = 2 * batch * 0.714e9  # AlexNet (torchvision widths): 0.714 GMACs per 224² image
    vgg_batch, vgg_image = 16, 128
    vgg_flops = 2 * vgg_batch * vgg_image ** 2 * 9 * (3 * 64 + 64 * 64 + (128 * 64 + 128 * 128) / 4
                                                      + (256 * 128 + 256 * 256) / 16)
    seq, width = 256, 512
    tf_flops = 6 * 8 * seq * 4 * (12 * width * width + 2 * seq * width)

    def images(n, size):
        return lambda: torch.randn(n, 3, size, size, device=device)

    return [
        _training_case(device, f"AlexNet (torch.nn modules) patched, train step B{batch} {image}²",
                       lambda: alexnet(stock=True),
                       lambda: (images(batch, image)(), torch.randint(0, 1000, (batch,), device=device)),
                       3 * alexnet_flops),
        _inference_case(device, f"AlexNet (torch.nn modules) patched, inference B{batch} {image}²",
                        lambda: alexnet(stock=True), patch, images(batch, image), alexnet_flops),
        _inference_case(device, f"VGG-BN-style Sequential fuse_for_inference, inference B{vgg_batch} {vgg_image}²",
                        _vgg_bn, fuse_for_inference, images(vgg_batch, vgg_image), vgg_flops),
        _training_case(device, f"TransformerEncoder 4L d{width} (pre-LN) patched, train step B8 L{seq}",
                       _transformer,
                       lambda: (torch.randn(8, seq, width, device=device), torch.randint(0, 10, (8,), device=device)),
                       tf_flops),
    ]
