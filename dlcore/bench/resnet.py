"""Benchmark cases for issue 6 (fused residual blocks):
- batch_norm_act forward+backward (training statistics, residual add, ReLU) at a ResNet layer1 activation, NCHW and
  channels_last, and BN + LeakyReLU at a DCGAN discriminator activation, against F.batch_norm → add → activation;
- NT-Xent (SimCLR's loss) forward+backward against the full-matrix textbook form;
- ResNet inference: dlcore.fuse_for_inference(resnet) in channels_last against the stock twin eager (NCHW, the
  issue's baseline), eager channels_last and torch.compile'd — CPU ResNet-18 batch 8 fp32 (targets ≥ 1.5× eager,
  ≥ 1.05× compiled), GPU ResNet-50 batch 64 bf16 (≥ 1.5× eager); on the CPU also with the opt-in Winograd 3×3
  convolutions (fuse_for_inference(winograd=True); an accuracy trade, so against eager only and without a target);
- ResNet training step (forward, cross-entropy, backward, AdamW step: dlcore.optim against torch.optim) in
  channels_last: dlcore blocks against the stock twin, eager and torch.compile'd — CPU ResNet-18 batch 8 fp32
  (≥ 1.2× eager, ≥ 1.0× compiled), GPU ResNet-50 batch 64 under bf16 autocast (≥ 1.15× eager, ≥ 1.0× compiled).
FLOPs: 2·MACs of the convolutions and the classifier (forward), ×3 for a training step."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dlcore.bench.harness import DLCORE, Case

CL = torch.channels_last


def _bn_case(device, name, shape, channels_last, activation, residual):
    from dlcore.functional import batch_norm_act

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    c = shape[1]
    fmt = CL if channels_last else torch.contiguous_format

    def setup(n_sets):
        def leaf(*s, dt=dtype, f=torch.contiguous_format):
            return torch.randn(*s, device=device, dtype=dt).contiguous(memory_format=f).requires_grad_()

        sets = [(leaf(*shape, f=fmt), leaf(*shape, f=fmt) if residual else None, leaf(c, dt=torch.float32),
                 leaf(c, dt=torch.float32)) for _ in range(n_sets)]
        stats = [torch.zeros(c, device=device), torch.ones(c, device=device)]
        state = {"i": 0}

        def ours(x, r, w, b):
            return batch_norm_act(x, *stats, w, b, True, residual=r, activation=activation, negative_slope=0.2)

        def stock(x, r, w, b):
            z = F.batch_norm(x, *stats, w.to(x.dtype), b.to(x.dtype), True)
            z = z if r is None else z + r
            return F.relu(z) if activation == "relu" else F.leaky_relu(z, 0.2)

        def variant(fn):
            def call():
                inputs = sets[state["i"] % n_sets]
                state["i"] += 1
                fn(*inputs).backward(torch.ones(shape, device=device, dtype=dtype).contiguous(memory_format=fmt))
            return call

        variants = {DLCORE: variant(ours), "torch eager": variant(stock)}
        if device != "cpu":
            variants["torch.compile"] = variant(torch.compile(stock))
        return variants

    n = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    # minimum traffic: forward reads x (+r) twice, writes y; backward reads dy, y, x twice, writes dx (+dr)
    nbytes = n * ((2 + (1 if residual else 0) + 1) + (6 + 1 + (1 if residual else 0)))
    return Case("batch_norm_act", f"{name} {'channels_last' if channels_last else 'NCHW'} "
                f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} fwd+bwd", device, setup, bytes=nbytes,
                baseline="torch eager", target=1.0,
                ops=("batch_norm_stats", "channel_affine_act", "channel_act_backward_reduce",
                     "channel_act_backward_apply"))


def _nt_xent_case(device, n, d):
    """SimCLR's loss, forward+backward, against the textbook form (full 2N×2N similarity matrix + cross-entropy)."""
    from dlcore.bench.transformer import _case
    from dlcore.functional import nt_xent_loss
    from dlcore.models.simclr import stock_nt_xent

    def make_inputs():
        return tuple(torch.randn(n, d, device=device, requires_grad=True) for _ in range(2))

    m = 2 * n
    nbytes = 4 * (3 * m * d + 2 * m)  # z read twice (forward, backward), dz written, the LSE
    return _case("nt_xent", f"NT-Xent 2N={m} d{d} fwd+bwd", device, make_inputs,
                 lambda a, b: nt_xent_loss(a, b, 0.5), lambda a, b: stock_nt_xent(a, b, 0.5), nbytes,
                 flops=3 * 2.0 * m * m * d, ops=("nt_xent", "nt_xent_backward"))


def _resnet_flops(model, image: int) -> float:
    """2·MACs of one image's forward pass (convolutions and fc), by a hook pass on a meta copy."""
    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            macs[0] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            macs[0] += out.numel() * mod.in_features

    probe = copy.deepcopy(model).to("meta")
    handles = [m.register_forward_hook(hook) for m in probe.modules()]
    with torch.no_grad():
        probe(torch.empty(1, 3, image, image, device="meta"))
    for h in handles:
        h.remove()
    return 2.0 * macs[0]


def _inference_case(device, arch, batch, image, dtype, target, winograd=False):
    from dlcore import patching
    from dlcore.models import resnet

    def setup(n_sets):
        torch.manual_seed(0)
        stock = getattr(resnet, arch)(stock=True).to(device, dtype).eval()
        fused = patching.fuse_for_inference(resnet.twin_of(stock), winograd=winograd).to(device, dtype)
        fused = fused.to(memory_format=CL)
        stock_cl = copy.deepcopy(stock).to(memory_format=CL)
        sets = [torch.randn(batch, 3, image, image, device=device, dtype=dtype) for _ in range(n_sets)]
        sets_cl = [x.contiguous(memory_format=CL) for x in sets]
        state = {"i": 0}

        def variant(model, data):
            @torch.no_grad()
            def call():
                state["i"] += 1
                return model(data[state["i"] % n_sets])
            return call

        variants = {DLCORE: variant(fused, sets_cl), "torch eager": variant(stock, sets),
                    "torch eager channels_last": variant(stock_cl, sets_cl)}
        if not winograd:  # (the opt-in case is read against eager only)
            variants["torch.compile"] = variant(torch.compile(copy.deepcopy(stock)), sets)
        return variants

    flops = batch * _resnet_flops(getattr(resnet, arch)(stock=True), image)
    how = "BN folded, channels_last, Winograd F(4×4,3×3) opt-in" if winograd else "BN folded, channels_last"
    return Case("resnet", f"{arch} inference B{batch} {image}x{image} {str(dtype).replace('torch.', '')} "
                f"(dlcore: {how})", device, setup, flops=flops, baseline="torch eager",
                target=None if winograd else target, quick=False,
                notes="opt-in accuracy trade: no target is read from it" if winograd else
                "issue 6 CPU: also ≥ 1.05× torch.compile")


def _training_case(device, arch, batch, image, autocast, target):
    from dlcore.bench.gpt import train_step_setup
    from dlcore.models import resnet

    def make_pair():
        stock = getattr(resnet, arch)(stock=True).to(device).to(memory_format=CL)
        ours = resnet.twin_of(stock).to(memory_format=CL)
        return resnet.WithLoss(ours), resnet.WithLoss(stock)

    def make_batch():
        return (torch.randn(batch, 3, image, image, device=device).contiguous(memory_format=CL),
                torch.randint(0, 1000, (batch,), device=device))

    base_setup = train_step_setup(make_pair, make_batch, device, autocast, True)

    def setup(n_sets):
        """The channels_last variants, plus stock eager in NCHW (torch's default layout) for the record."""
        variants = base_setup(n_sets)
        nchw = train_step_setup(lambda: tuple(m.to(memory_format=torch.contiguous_format) for m in make_pair()),
                                lambda: tuple(t.contiguous() for t in make_batch()), device, autocast, False)(n_sets)
        variants["torch eager NCHW"] = nchw["torch eager"]
        return variants

    flops = 3 * batch * _resnet_flops(getattr(resnet, arch)(stock=True), image)
    return Case("resnet", f"{arch} train step B{batch} {image}x{image} channels_last "
                f"{'bf16 autocast' if autocast else 'fp32'}", device, setup, flops=flops,
                baseline="torch eager", target=target, quick=False,
                notes="issue 6: also ≥ 1.0× torch.compile")


def cases(device: str) -> list[Case]:
    out = [_bn_case(device, "BN+add+ReLU [8,64,56,56]", (8, 64, 56, 56), cl, "relu", True) for cl in (False, True)]
    out.append(_bn_case(device, "BN+LeakyReLU(0.2) [64,256,8,8]", (64, 256, 8, 8), False, "leaky_relu", False))
    out += [_nt_xent_case(device, n, 128) for n in ((256, 1024) if device == "cpu" else (1024, 4096))]
    if device == "cpu":
        out += [_inference_case(device, "resnet18", 8, 224, torch.float32, 1.5),
                _inference_case(device, "resnet18", 8, 224, torch.float32, None, winograd=True),
                _training_case(device, "resnet18", 8, 224, False, 1.2)]
    else:
        out += [_inference_case(device, "resnet50", 64, 224, torch.bfloat16, 1.5),
                _training_case(device, "resnet50", 64, 224, True, 1.15)]
    return out
