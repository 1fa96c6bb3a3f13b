"""nt_xent_loss (dlcore/ops/nt_xent.py): every backend against an independent float64 formula (cross-entropy over
the masked 2N×2N similarity matrix, the way SimCLR's reference code writes it) on fresh inputs, odd sizes, the
gradient of both views; gradcheck; opcheck; torch.compile; the O(N) saved state; bad input."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

import dlcore
from dlcore.functional import nt_xent_loss
from dlcore.ops import nt_xent as ops
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
CASES = backend_device_pairs(ops.FORWARD, torch.float32)


def simclr_loss(z1, z2, temperature):
    """The textbook form: logits = cos-sim/τ with the diagonal removed, targets = the other view."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.t() / temperature
    logits = logits - torch.eye(2 * n, dtype=z.dtype) * 1e9
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("n,d", [(1, 3), (7, 5), (129, 128), (33, 200), (300, 64)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_loss_and_gradients_match_float64(backend, device, n, d, temperature):
    gen = torch.Generator().manual_seed(SEED + n + d)
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64)  # correlated views, as in training
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    want = simclr_loss(a, b, temperature)
    grads_want = torch.autograd.grad(want, (a, b))
    a32, b32 = (t.to(device, torch.float32).requires_grad_() for t in (z1, z2))
    with dlcore.use_backend(backend):
        got = nt_xent_loss(a32, b32, temperature)
        grads = torch.autograd.grad(got * 3.0, (a32, b32))  # a non-unit upstream gradient
    assert got.dtype == torch.float32 and got.dim() == 0
    tol = 2e-5 if device == "cpu" else 3e-3  # the GPU kernel's dots are tf32
    assert abs(got.item() - want.item()) <= tol * (1 + abs(want.item()))
    for g, w in zip(grads, grads_want):
        assert (g.double().cpu() - 3 * w).abs().max().item() <= tol * (1 + 3 * w.abs().max().item())


def test_float64_reference_gradcheck():
    gen = torch.Generator().manual_seed(SEED)
    z1 = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3), (z1, z2))
    torch.testing.assert_close(nt_xent_loss(z1, z2, 0.3), simclr_loss(z1, z2, 0.3))


def test_saves_only_o_n_state():
    """Backward keeps z and the per-row log-sum-exp, never an M×M matrix."""
    z1, z2 = torch.randn(64, 16, requires_grad=True), torch.randn(64, 16, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nt_xent_loss(z1, z2)
    assert max(sizes) <= 128 * 16


def test_opcheck_and_compile():
    z = torch.randn(10, 6, requires_grad=True)
    torch.library.opcheck(ops.nt_xent_op, (z, 0.5))
    fn = torch.compile(lambda a, b: nt_xent_loss(a, b, 0.2), fullgraph=True)
    a, b = z[:5].detach(), z[5:].detach()
    torch.testing.assert_close(fn(a, b), simclr_loss(a, b, 0.2), rtol=1e-5, atol=1e-5)


def test_bad_input():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="z2 must have shape"):
        nt_xent_loss(z, torch.randn(5, 8))
    with pytest.raises(ValueError, match="temperature must be positive"):
        nt_xent_loss(z, z, 0.0)
    with pytest.raises(ValueError, match=r"z1 must be \[N, d\]"):
        nt_xent_loss(z[0], z[0])
    with pytest.raises(ValueError, match="empty"):
        nt_xent_loss(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(TypeError, match="z2 is torch.float64"):
        nt_xent_loss(z, z.double())
    with pytest.raises(TypeError, match="floating-point"):
        nt_xent_loss(z.long(), z.long())
