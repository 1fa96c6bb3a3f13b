"""Random bad (and good) input to the public API: the functional ops, the replay buffers and the optimizers get
tensors of odd shapes, dtypes and layouts (empty, 0-d, an extra dim, integer/bool/fp16/bf16/fp64, transposed,
expanded stride-0, all-NaN, channels_last, requires_grad or not) and out-of-range scalars. Every call must either
work (and its backward, when it carries a gradient) or raise one of the exceptions torch itself raises for bad
input — never another exception type, and never crash the process (a crash fails the whole run). A refused
replay call leaves the tree as it was; an optimizer configuration the docs support (floating dense params, sane
hyper-parameters) must work. A fuzz of this kind found five defects in session 11 (stride/padding errors without
the argument's name, empty last dims, expanded running stats, float replay indices, fp64 params with bf16 Adam
state); with the last one put back, the optimizer part fails for every seed tried."""
import os
import random
import time

import pytest
import torch

import dlcore
import dlcore.functional as DF

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
EXPECTED = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)
KINDS = ["ok", "ok", "ok", "empty", "int", "bool", "f64", "bf16", "f16", "transposed", "expanded", "nan", "scalar",
         "extra_dim", "channels_last"]


def _tensor(rnd: random.Random, shape: tuple) -> torch.Tensor:
    """A tensor meant to have `shape`, spoiled one way or another (or not)."""
    kind = rnd.choice(KINDS)
    shape = list(shape)
    if kind == "scalar":
        return torch.tensor(1.0, requires_grad=rnd.random() < 0.5)
    if kind == "empty":
        shape[rnd.randrange(len(shape))] = 0
    if kind == "extra_dim":
        shape.append(2)
    t = torch.randn(shape)
    t = {"int": lambda: t.long(), "bool": lambda: t > 0, "f64": t.double, "bf16": t.bfloat16, "f16": t.half,
         "nan": lambda: t.fill_(float("nan"))}.get(kind, lambda: t)()
    if kind == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1).contiguous().transpose(0, 1)  # the same shape, not contiguous
    if kind == "expanded" and t.numel() > 0:
        t = t.flatten()[:1].expand(t.shape)
    if kind == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    if t.is_floating_point() and rnd.random() < 0.5:
        t = t.detach().requires_grad_()
    return t


def _functional_calls(rnd: random.Random):
    """(name, zero-argument call) of every functional op with spoiled arguments."""
    T = lambda *s: _tensor(rnd, s)  # noqa: E731
    n, c, h, w = rnd.choice([(2, 3, 9, 9), (1, 4, 7, 7), (2, 2, 5, 6)])
    co, k = rnd.choice([1, 3, 4]), rnd.choice([1, 3, 5])
    r, cols = rnd.choice([(3, 5), (1, 1), (4, 129)])
    target = torch.randint(-2, cols + 2, (r,)) if rnd.random() < 0.3 else torch.randint(0, cols, (r,))
    b, heads, length, d = rnd.choice([(1, 1, 1, 8), (2, 3, 5, 16)])
    return [
        ("conv2d_relu", lambda: DF.conv2d_relu(T(n, c, h, w), T(co, c, k, k), rnd.choice([None, T(co)]),
                                               stride=rnd.choice([1, 2, 0]), padding=rnd.choice([0, 1, -1]),
                                               groups=rnd.choice([1, 2]))),
        ("conv2d_relu_maxpool2d", lambda: DF.conv2d_relu_maxpool2d(
            T(n, c, h, w), T(co, c, k, k), rnd.choice([None, T(co)]), padding=rnd.choice([0, 1]),
            pool_kernel_size=rnd.choice([1, 2, 3, 20]), pool_stride=rnd.choice([None, 1, 2, 0]),
            pool_padding=rnd.choice([0, 1, 2]), ceil_mode=rnd.random() < 0.5)),
        ("layer_norm", lambda: DF.layer_norm(T(r, cols), rnd.choice([cols, cols + 1]), rnd.choice([None, T(cols)]),
                                             rnd.choice([None, T(cols)]), residual=rnd.choice([None, T(r, cols)]))),
        ("bias_gelu", lambda: DF.bias_gelu(T(r, cols), T(cols), approximate=rnd.choice(["none", "tanh"]),
                                           dropout_p=rnd.choice([0.0, 0.5, 1.5]))),
        ("dropout", lambda: DF.dropout(T(r, cols), rnd.choice([0.0, 0.5, 1.0, -0.1]), training=rnd.random() < 0.8)),
        ("cross_entropy", lambda: DF.cross_entropy(T(r, cols), rnd.choice([target, target.float()]),
                                                   label_smoothing=rnd.choice([0.0, 0.1, 2.0]))),
        ("linear_cross_entropy", lambda: DF.linear_cross_entropy(T(r, cols), T(7, cols), target.clamp(max=6))),
        ("attention", lambda: DF.scaled_dot_product_attention(T(b, heads, length, d), T(b, heads, length, d),
                                                              T(b, heads, length, d), is_causal=rnd.random() < 0.5,
                                                              dropout_p=rnd.choice([0.0, 0.5, -0.1]))),
        ("batch_norm_act", lambda: DF.batch_norm_act(
            T(n, c, h, w), T(c), T(c), T(c), T(c), training=rnd.random() < 0.5,
            residual=rnd.choice([None, T(n, c, h, w)]), activation=rnd.choice(["relu", "leaky_relu", "bogus"]))),
        ("nt_xent_loss", lambda: DF.nt_xent_loss(T(r + 1, cols), T(r + 1, cols),
                                                 temperature=rnd.choice([0.5, 0.0, -1.0]))),
        ("additive_attention", lambda: DF.additive_attention(
            T(2, 4), T(2, 5, 4), T(4), T(2, 5, 3), rnd.choice([None, torch.tensor([5, 3]), torch.tensor([0, 9])]))),
    ]


def _run(call):
    out = call()
    out = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.float().sum().backward()


def test_functional_ops_fail_cleanly():
    rnd = random.Random(SEED)
    torch.manual_seed(SEED)
    for _ in range(600):
        name, call = rnd.choice(_functional_calls(rnd))
        try:
            _run(call)
        except EXPECTED:
            pass
        except Exception as exc:  # noqa: BLE001 — the point of the test
            pytest.fail(f"{name} raised {type(exc).__name__}: {exc} (seed {SEED})")


def test_replay_buffers_fail_cleanly_and_keep_their_trees():
    from dlcore.rl import PrioritizedReplayBuffer

    rnd = random.Random(SEED)
    torch.manual_seed(SEED)
    for it in range(40):
        capacity = rnd.choice([1, 7, 129])
        buf = PrioritizedReplayBuffer(capacity, seed=it)
        n = rnd.choice([1, capacity, capacity + 3])
        buf.extend(obs=torch.randn(n, 4), action=torch.randint(0, 4, (n,)), reward=torch.randn(n))
        for _ in range(15):
            before = buf._tree.sum.clone()
            m = rnd.choice([1, 4])
            index = rnd.choice([torch.randint(0, len(buf), (m,)), torch.full((m,), -1), torch.full((m,), len(buf)),
                                torch.rand(m), list(range(m)), torch.zeros(m, dtype=torch.int32)])
            priority = rnd.choice([torch.rand(m), -torch.rand(m), torch.full((m,), float("nan")), torch.rand(m + 1),
                                   torch.rand(m).half(), [1.0] * m])
            try:
                if rnd.random() < 0.5:
                    buf.sample(rnd.choice([1, 2, 0, -1, 5000]), beta=rnd.choice([None, 0.4, -1.0, 2.0]))
                else:
                    buf.update_priorities(index, priority)
            except EXPECTED:
                assert torch.equal(buf._tree.sum, before), "a refused call changed the tree"
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"replay raised {type(exc).__name__}: {exc} (seed {SEED})")


def test_optimizers_fail_cleanly():
    rnd = random.Random(SEED)
    torch.manual_seed(SEED)
    for _ in range(400):
        params = []
        for _ in range(rnd.choice([1, 3])):
            p = torch.nn.Parameter(_tensor(rnd, rnd.choice([(3,), (7, 5), (2, 3, 4, 5)])).detach().float()
                                   if rnd.random() < 0.8 else torch.randn(4, dtype=rnd.choice(
                                       [torch.float64, torch.bfloat16, torch.complex64])))
            if rnd.random() < 0.9:
                p.grad = torch.randn_like(p)
            params.append(p)
        kwargs = dict(lr=rnd.choice([1e-3, 1e-2, 0.0, -1.0]), eps=rnd.choice([1e-8, 1e-6, 1e-3, -1.0]),
                      weight_decay=rnd.choice([0.0, 0.01, 0.1, -1.0]), amsgrad=rnd.random() < 0.3)
        if rnd.random() < 0.4:
            kwargs["state_dtype"] = rnd.choice([torch.bfloat16, torch.float16, torch.int32])
        # what the optimizers document as supported must work: floating dense params, sane hyper-parameters
        valid = (kwargs["lr"] >= 0 and kwargs["eps"] > 0 and kwargs["weight_decay"] >= 0
                 and kwargs.get("state_dtype") != torch.int32
                 and all(p.dtype in (torch.float32, torch.float64, torch.bfloat16)
                         and (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last))
                         for p in params))
        try:
            opt = rnd.choice([dlcore.optim.Adam, dlcore.optim.AdamW])(params, **kwargs)
            opt.step()
            opt.load_state_dict(opt.state_dict())
        except EXPECTED as exc:
            assert not valid, f"a supported configuration failed: {type(exc).__name__}: {exc} ({kwargs}, " \
                              f"{[(tuple(p.shape), p.dtype) for p in params]}, seed {SEED})"
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"optimizer raised {type(exc).__name__}: {exc} (seed {SEED})")
