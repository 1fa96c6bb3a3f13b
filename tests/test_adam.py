"""dlcore.optim.Adam / AdamW and dlcore.functional.adam on every backend available here, against torch.optim
and a float64 oracle. Fresh random inputs every run (seeded from the clock, printed on failure)."""
import io
import os
import time

import pytest
import torch
import torch.nn as nn

import dlcore
from dlcore.testing import backend_device_pairs, max_error

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))  # set it to replay a failure
PAIRS = backend_device_pairs("adam", torch.float32)
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
STEPS = 50


def small_net(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth activations only: at a ReLU kink a one-ulp difference flips a unit and the runs part for good
    # (seen with the interpreter's rounding), which would test chaos rather than the optimizer.
    net = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Tanh(), nn.Flatten(), nn.Linear(7 * 5 * 5, 129), nn.Tanh(),
                        nn.Linear(129, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net.to(device=device, dtype=dtype)


def make_batches(n, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 7, 7, generator=g).to(device), torch.randn(16, 1, generator=g).to(device))
            for _ in range(n)]


def train(net, opt, batches, backend=None, dtype=None):
    with dlcore.use_backend(backend):
        for x, y in batches:
            x, y = (x.to(dtype), y.to(dtype)) if dtype is not None else (x, y)
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
    return [p.detach() for p in net.parameters()]


OPTIONS = [
    (torch.optim.Adam, dlcore.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dlcore.optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.Adam, dlcore.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=0.05, betas=(0.8, 0.99))),
    (torch.optim.Adam, dlcore.optim.Adam, dict(lr=5e-3, maximize=True, eps=1e-6)),
    (torch.optim.AdamW, dlcore.optim.AdamW, dict(lr=1e-2)),
    (torch.optim.AdamW, dlcore.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.3)),
]


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", range(len(OPTIONS)))
def test_matches_torch_over_50_steps(backend, device, case):
    torch_cls, dl_cls, kw = OPTIONS[case]
    batches = make_batches(STEPS, device, SEED + case)
    oracle = small_net(device, torch.float64, SEED)
    stock = small_net(device, torch.float32, SEED)
    ours = small_net(device, torch.float32, SEED)
    want = train(oracle, torch_cls(oracle.parameters(), foreach=False, **kw), batches, dtype=torch.float64)
    ref32 = train(stock, torch_cls(stock.parameters(), foreach=False, **kw), batches)
    got = train(ours, dl_cls(ours.parameters(), **kw), batches, backend)
    for g, r, w in zip(got, ref32, want):
        # the FlashAttention criterion: at most 2x torch's own fp32 error against the float64 run, plus ~80 ulps
        # of the parameters' scale for 50 steps of rounding in another order (a wrong formula errs by ≥ 1e-4)
        assert max_error(g, w) <= 2 * max_error(r, w) + 5e-6, f"seed {SEED}"


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_param_groups_tensor_lr_and_missing_grads(backend, device):
    nets = [small_net(device, torch.float32, SEED) for _ in range(2)]
    oracle = small_net(device, torch.float64, SEED)

    def groups(net, lr):  # groups of generators, as `{"params": model.head.parameters()}` gives
        ps = list(net.parameters())
        return [{"params": iter(ps[:2]), "lr": lr, "betas": (0.5, 0.9)},
                {"params": (p for p in ps[2:4]), "weight_decay": 0.2}, {"params": ps[4:]}]

    frozen = lambda net: list(net.parameters())[-1].requires_grad_(False)  # noqa: E731  (no grad: not stepped)
    for n in (*nets, oracle):
        frozen(n)
    batches = make_batches(20, device, SEED)
    want = train(oracle, torch.optim.Adam(groups(oracle, 3e-2), lr=1e-2, foreach=False), batches, dtype=torch.float64)
    ref = train(nets[0], torch.optim.Adam(groups(nets[0], 3e-2), lr=1e-2, foreach=False), batches)
    got = train(nets[1], dlcore.optim.Adam(groups(nets[1], torch.tensor(3e-2)), lr=1e-2), batches, backend)
    for g, r, w in zip(got, ref, want):
        assert max_error(g, w) <= 2 * max_error(r, w) + 5e-6, f"seed {SEED}"
    assert torch.equal(got[-1], list(small_net(device, torch.float32, SEED).parameters())[-1].detach())


def test_add_param_group_takes_generators_and_refuses_sets():
    stock, ours = small_net("cpu", torch.float32, SEED), small_net("cpu", torch.float32, SEED)
    opts = []
    for net, cls in ((stock, torch.optim.Adam), (ours, dlcore.optim.Adam)):
        opt = cls(net[0].parameters(), lr=1e-2)
        opt.add_param_group({"params": net[3].parameters(), "lr": 3e-2})
        opt.add_param_group({"params": net[5].weight})
        opts.append(opt)
    assert [len(g["params"]) for g in opts[1].param_groups] == [2, 2, 1]
    batches = make_batches(5, "cpu", SEED)
    for g, r in zip(train(ours, opts[1], batches), train(stock, opts[0], batches)):
        assert max_error(g, r) <= 1e-5, f"seed {SEED}"
    assert len(opts[1].state) == 5
    with pytest.raises(TypeError, match="set"):
        opts[1].add_param_group({"params": {ours[5].bias}})


def _rand_lists(n_elems, device, dtype, state_dtype, amsgrad=False, master=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(n, generator=g)).to(device, dtype) for n in n_elems]
    grads = [(torch.randn(n, generator=g)).to(device, dtype) for n in n_elems]
    m = [(torch.randn(n, generator=g) * 0.1).to(device, state_dtype) for n in n_elems]
    v = [(torch.rand(n, generator=g) * 0.1).to(device, state_dtype) for n in n_elems]
    vmax = [x.clone() * 1.5 for x in v] if amsgrad else []
    masters = [p.float() + torch.randn(p.shape, generator=g).to(device) * 1e-3 for p in params] if master else None
    steps = [torch.tensor(float(k + 1)) for k in range(len(n_elems))]
    return params, grads, m, v, vmax, steps, masters


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype,state_dtype,master", [
    (torch.bfloat16, torch.bfloat16, False), (torch.float16, torch.float16, False),
    (torch.bfloat16, torch.float32, True), (torch.float16, torch.float32, True), (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.bfloat16, True)])
def test_low_precision_step_matches_float64(backend, device, dtype, state_dtype, master):
    """One step on odd sizes: every output within one rounding of its dtype of the float64 result."""
    sizes = [1, 7, 129, 1000, 70001]
    lists = _rand_lists(sizes, device, dtype, state_dtype, amsgrad=True, master=master, seed=SEED)
    ref = [[t.double() for t in lst] if isinstance(lst, list) else None for lst in lists[:5]]
    ref_master = [t.double() for t in lists[6]] if master else None
    steps_ref = [s.clone().double() for s in lists[5]]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, amsgrad=True, decoupled_weight_decay=True)
    with dlcore.use_backend("reference"):
        dlcore.functional.adam(*ref, steps_ref, master_params=ref_master, **kw)
    with dlcore.use_backend(backend):
        dlcore.functional.adam(*lists[:6], master_params=lists[6], **kw)
    p_eps = torch.finfo(dtype).eps
    s_eps = torch.finfo(state_dtype).eps
    for i in range(len(sizes)):
        base = lambda t: t.abs().double() + 1e-30  # noqa: E731
        want_p = ref_master[i] if master else ref[0][i]
        assert ((lists[0][i].double() - want_p).abs() <= p_eps * base(want_p) + 1e-6).all()
        if master:
            assert ((lists[6][i].double() - ref_master[i]).abs() <= 1e-6 * base(ref_master[i]) + 1e-7).all()
            assert torch.equal(lists[0][i], lists[6][i].to(dtype))  # param = master rounded to nearest
        for k in (2, 3, 4):  # exp_avg, exp_avg_sq, max_exp_avg_sq: within one unit of the state dtype
            assert ((lists[k][i].double() - ref[k][i]).abs() <= 2 * s_eps * base(ref[k][i]) + 1e-7).all()
    assert [float(s) for s in lists[5]] == [float(s) for s in steps_ref]


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_bf16_state_is_stochastically_rounded(backend, device):
    """With β1 = 0.5, exp_avg after one step from zero is g/2 exactly = 0.5 + 2⁻⁹ + 2⁻¹¹, 0.625 of the way from
    the bf16 value 0.5 to the next one (0.5 + 2⁻⁸). Stored in bf16 it must land on one of those two, rounding up
    with probability 0.625: unbiased."""
    n = 200_000
    g_val = 1.0 + 2.0 ** -8 + 2.0 ** -10
    p = torch.zeros(n, device=device)
    m = [torch.zeros(n, device=device, dtype=torch.bfloat16)]
    v = [torch.zeros(n, device=device, dtype=torch.bfloat16)]
    with dlcore.use_backend(backend):
        dlcore.functional.adam([p], [torch.full((n,), g_val, device=device)], m, v, [], [torch.tensor(0.0)],
                               beta1=0.5, seed=SEED)
    got = m[0].double().cpu()
    assert set(torch.unique(got).tolist()) == {0.5, 0.5 + 2.0 ** -8}
    up = (got > 0.5).double().mean().item()
    assert abs(up - 0.625) < 5 * (0.625 * 0.375 / n) ** 0.5, f"rounded up {up:.4f} of the time, seed {SEED}"


def test_stochastic_rounding_is_the_same_on_every_backend():
    """Same inputs and seed → the compiled backends round bf16 state like the reference (one unit apart at most,
    where FMA contraction changed the fp32 value being rounded)."""
    outs = {}
    for backend, device in PAIRS:
        lists = _rand_lists([5000, 333], device, torch.float32, torch.bfloat16, amsgrad=True, seed=SEED)
        with dlcore.use_backend(backend):
            dlcore.functional.adam(*lists[:6], lr=1e-3, amsgrad=True, seed=1234)
        outs[backend] = [t.cpu() for t in lists[2] + lists[3] + lists[4]]
    ref = outs.pop("reference")
    for backend, tensors in outs.items():
        for a, b in zip(tensors, ref):
            ulp = b.float().abs() * 2.0 ** -7 + 1e-30
            assert ((a.float() - b.float()).abs() <= ulp).all(), backend
            assert (a != b).float().mean() < 0.01, backend


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_grad_scale_and_found_inf(backend, device):
    scale = 1024.0
    a = _rand_lists([129, 7], device, torch.float32, torch.float32, seed=SEED)
    b = [[t.clone() for t in lst] if isinstance(lst, list) else lst for lst in a]
    b[1] = [g * scale for g in b[1]]
    before = [p.clone() for p in a[0]]
    with dlcore.use_backend(backend):
        dlcore.functional.adam(*a[:6], lr=1e-2, found_inf=torch.ones((), device=device))
        assert all(torch.equal(x, y) for x, y in zip(a[0], before)), "found_inf must skip the step"
        assert [float(s) for s in a[5]] == [1.0, 2.0], "a skipped step is not counted"
        dlcore.functional.adam(*a[:6], lr=1e-2, found_inf=torch.zeros((), device=device))
        dlcore.functional.adam(*b[:6], lr=1e-2, grad_scale=torch.tensor(scale, device=device))
    for x, y in zip(a[0], b[0]):
        assert torch.allclose(x, y, rtol=0, atol=1e-6)


@pytest.mark.skipif(dlcore._ext.cpu is None, reason="CPU extension not built")
@pytest.mark.parametrize("state_dtype,amsgrad", [(torch.float32, True), (torch.bfloat16, False)])
def test_cpu_counts_steps_as_the_scalar_table_does(state_dtype, amsgrad):
    """fp32 host step counters: the C++ twin increments them and derives lr, alpha, eps_hat itself; float64
    counters take the scalar_table path. Both must give the same bits, step after step (lr a host tensor too)."""
    a = _rand_lists([1, 129, 70001], "cpu", torch.float32, state_dtype, amsgrad=amsgrad, seed=SEED)
    b = [[t.clone() for t in lst] if isinstance(lst, list) else lst for lst in a]
    b[5] = [s.double() for s in b[5]]
    with dlcore.use_backend("cpu"):
        for k in range(5):
            lr = 1e-2 if k % 2 else torch.tensor(3e-3)
            for lists in (a, b):
                dlcore.functional.adam(*lists[:6], lr=lr, amsgrad=amsgrad, weight_decay=0.1, seed=5,
                                       decoupled_weight_decay=True)
    for x, y in zip(sum(a[:5], []), sum(b[:5], [])):
        assert torch.equal(x, y)
    assert [float(s) for s in a[5]] == [float(s) for s in b[5]] == [6.0, 7.0, 8.0]


def test_with_torch_grad_scaler():
    net_a, net_b = small_net("cpu", seed=SEED), small_net("cpu", seed=SEED)
    opt_a = dlcore.optim.Adam(net_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-2, foreach=False)
    scaler_a, scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for i, (x, y) in enumerate(make_batches(6, "cpu", SEED)):
        for net, opt, scaler in ((net_a, opt_a, scaler_a), (net_b, opt_b, scaler_b)):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean() * (float("inf") if i == 2 else 1.0)  # step 2 overflows: skipped
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert float(opt_a.state[next(net_a.parameters())]["step"]) == 5.0


def test_state_dict_round_trips_with_torch():
    batches = make_batches(10, "cpu", SEED)
    nets = [small_net("cpu", seed=SEED) for _ in range(2)]
    ours = dlcore.optim.AdamW(nets[0].parameters(), lr=1e-2, amsgrad=True)
    theirs = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, amsgrad=True, foreach=False)
    train(nets[0], ours, batches[:5])
    train(nets[1], theirs, batches[:5])
    # swap: torch continues from dlcore's state and dlcore from torch's
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    ours_sd = torch.load(buf, weights_only=False)
    theirs_sd = theirs.state_dict()
    nets2 = [small_net("cpu", seed=0) for _ in range(2)]
    for src, dst in zip(nets, reversed(nets2)):
        dst.load_state_dict(src.state_dict())
    torch_from_ours = torch.optim.AdamW(nets2[1].parameters(), foreach=False)
    torch_from_ours.load_state_dict(ours_sd)
    ours_from_torch = dlcore.optim.AdamW(nets2[0].parameters())
    ours_from_torch.load_state_dict(theirs_sd)
    assert ours_from_torch.param_groups[0]["amsgrad"] and ours_from_torch.param_groups[0]["lr"] == 1e-2
    a = train(nets2[0], ours_from_torch, batches[5:])
    b = train(nets2[1], torch_from_ours, batches[5:])
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5)


def test_state_dict_keeps_bf16_state_and_fp32_master():
    net = small_net("cpu", torch.bfloat16, SEED)
    opt = dlcore.optim.Adam(net.parameters(), lr=1e-2, state_dtype=torch.bfloat16, master_weights=True)
    train(net, opt, make_batches(3, "cpu", SEED), dtype=torch.bfloat16)
    sd = opt.state_dict()
    clone = dlcore.optim.Adam(small_net("cpu", torch.bfloat16, 1).parameters())
    clone.load_state_dict(sd)
    assert clone.param_groups[0]["master_weights"] and clone.param_groups[0]["state_dtype"] == torch.bfloat16
    for s_old, s_new in zip(opt.state.values(), clone.state.values()):
        assert s_new["master_param"].dtype == torch.float32 and torch.equal(s_new["master_param"], s_old["master_param"])
        assert s_new["exp_avg"].dtype == torch.bfloat16 and torch.equal(s_new["exp_avg"], s_old["exp_avg"])
        assert torch.equal(s_new["step"], s_old["step"])


def test_nan_gradients_propagate_like_torch():
    p_a, p_b = torch.randn(100), torch.randn(100)
    p_b.copy_(p_a)
    g = torch.randn(100)
    g[[3, 50]] = float("nan")
    g[7] = float("inf")
    for p, opt_cls in ((p_a, dlcore.optim.Adam), (p_b, torch.optim.Adam)):
        p.requires_grad_()
        p.grad = g.clone()
        opt_cls([p], lr=1e-2).step()
    assert torch.equal(torch.isnan(p_a), torch.isnan(p_b))
    finite = torch.isfinite(p_b)
    assert torch.allclose(p_a[finite], p_b[finite], atol=1e-6)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_empty_parameters(backend, device):
    lists = _rand_lists([0, 5, 0], device, torch.float32, torch.float32, seed=SEED)
    only_empty = _rand_lists([0], device, torch.float32, torch.float32, seed=SEED)
    want = [p.clone() for p in lists[0]]
    with dlcore.use_backend(backend):
        dlcore.functional.adam(*lists[:6], lr=1e-2)
        dlcore.functional.adam(*only_empty[:6], lr=1e-2)
    assert not torch.equal(lists[0][1], want[1]) and lists[0][0].numel() == 0
    assert [float(s) for s in only_empty[5]] == [2.0]  # steps count as in torch


def test_channels_last_parameters():
    conv_a, conv_b = nn.Conv2d(4, 8, 3), nn.Conv2d(4, 8, 3)
    conv_b.load_state_dict(conv_a.state_dict())
    conv_a, conv_b = conv_a.to(memory_format=torch.channels_last), conv_b.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last)
    for conv, cls in ((conv_a, dlcore.optim.Adam), (conv_b, torch.optim.Adam)):
        opt = cls(conv.parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            conv(x).square().mean().backward()
            opt.step()
    assert torch.allclose(conv_a.weight, conv_b.weight, atol=1e-6)


def test_float64_params_with_bf16_state():
    """fp64 params (the reference backend, math in fp64) with bf16 moments: the stochastic rounding reads the
    moments' fp32 bits (it read fp64 words as pairs of int32 and failed on a shape mismatch); the params follow
    fp64 Adam within the bf16 state's rounding."""
    gen = torch.Generator().manual_seed(SEED)
    w = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    ours, ref = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    opt = dlcore.optim.AdamW([ours], lr=1e-2, state_dtype=torch.bfloat16)
    stock = torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(3):
        g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        stock.step()
    assert opt.state[ours]["exp_avg"].dtype == torch.bfloat16
    assert (ours.detach() - ref.detach()).abs().max().item() < 3e-2 * 1e-2 * 3  # 3 steps of lr, within ~3% each
    wide = nn.Parameter(w.clone())  # master_weights keeps fp32 copies of bf16/fp16 params only (not a lossy one)
    masters = dlcore.optim.Adam([wide], master_weights=True)
    wide.grad = torch.ones_like(w)
    masters.step()
    assert "master_param" not in masters.state[wide]


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("opt_name,kw", [("Adam", dict(weight_decay=0.1)), ("AdamW", dict(amsgrad=True)),
                                         ("Adam", dict(maximize=True, master_weights=True))])
def test_complex_parameters_step_as_torch(backend, device, opt_name, kw):
    """Complex parameters (next to real ones) step as torch's Adam/AdamW step them, real and imaginary parts as
    independent reals; the states stay complex, so state dicts load both ways (master_weights: none kept for a
    complex parameter)."""
    gen = torch.Generator().manual_seed(SEED)
    init = [torch.randn(5, 3, generator=gen, dtype=torch.complex128), torch.randn(7, generator=gen, dtype=torch.float64)]
    runs = {}
    for name, cls, dtype_of in (("oracle", getattr(torch.optim, opt_name), lambda t: t.dtype),
                                ("stock", getattr(torch.optim, opt_name), None), ("ours", getattr(dlcore.optim, opt_name), None)):
        params = [nn.Parameter((t if dtype_of else t.to(torch.complex64 if t.is_complex() else torch.float32)).to(device))
                  for t in init]
        extra = {k: v for k, v in kw.items() if k != "master_weights" or name == "ours"}
        opt = cls(params, lr=0.05, **({"foreach": False} if name != "ours" else {}), **extra)
        step_gen = torch.Generator().manual_seed(SEED + 1)
        with dlcore.use_backend(backend if name == "ours" else None):
            for _ in range(10):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=step_gen, dtype=p.dtype).to(device)
                opt.step()
        runs[name] = (params, opt)
    (want, _), (ref, stock), (got, opt) = runs["oracle"], runs["stock"], runs["ours"]
    for g, r, w in zip(got, ref, want):
        assert g.dtype == r.dtype and max_error(g, w) <= 2 * max_error(r, w) + 5e-6, f"seed {SEED}"
    assert opt.state[got[0]]["exp_avg"].dtype == torch.complex64 and "master_param" not in opt.state[got[0]]
    stock.load_state_dict(opt.state_dict())
    opt.load_state_dict(stock.state_dict())
    with pytest.raises(ValueError, match="complex"):
        dlcore.optim.Adam([nn.Parameter(torch.zeros(3, dtype=torch.complex64))], state_dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = dlcore.optim.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(TypeError, match="floating-point"):
        dlcore.optim.Adam([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="several devices"):
        dlcore.optim.Adam([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(ValueError, match="learning rate"):
        dlcore.optim.Adam([nn.Parameter(torch.zeros(3))], lr=-1)
    with pytest.raises(ValueError, match="beta"):
        dlcore.optim.Adam([nn.Parameter(torch.zeros(3))], betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="state_dtype"):
        dlcore.optim.Adam([nn.Parameter(torch.zeros(3))], state_dtype=torch.int8)
    with pytest.raises(NotImplementedError, match="differentiable"):
        dlcore.optim.Adam([nn.Parameter(torch.zeros(3))], differentiable=True)
    p, g, m, v, _, steps, _ = _rand_lists([5, 6], "cpu", torch.float32, torch.float32)
    with pytest.raises(ValueError, match="grads has 1 tensors"):
        dlcore.functional.adam(p, g[:1], m, v, [], steps)
    with pytest.raises(TypeError, match=r"grads\[1\] is torch.float16"):
        dlcore.functional.adam(p, [g[0], g[1].half()], m, v, [], steps)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] has shape"):
        dlcore.functional.adam(p, g, [m[1], m[1]], v, [], steps)
    strided = torch.randn(6, 4)[:, 0]
    with pytest.raises(ValueError, match="not dense"):
        dlcore.functional.adam([strided], [torch.randn(6)], [torch.zeros(6)], [torch.zeros(6)], [], [torch.tensor(0.)])
    with pytest.raises(TypeError, match="found_inf"):
        dlcore.functional.adam(p, g, m, v, [], steps, found_inf=torch.zeros(3))
    with pytest.raises(ValueError, match="master_params are fp32 copies"):
        dlcore.functional.adam(p, g, m, v, [], steps, master_params=[t.clone() for t in p])
    with pytest.raises(ValueError, match="amsgrad needs"):
        dlcore.functional.adam(p, g, m, v, [], steps, amsgrad=True)
    if not torch.cuda.is_available():
        with pytest.raises(dlcore.BackendUnavailableError, match="cuda"):
            with dlcore.use_backend("cuda"):
                dlcore.functional.adam(p, g, m, v, [], steps)
    with pytest.raises(dlcore.BackendUnavailableError, match="float64"):
        with dlcore.use_backend("cpu"):
            dlcore.functional.adam([t.double() for t in p], [t.double() for t in g], m, v, [], steps)


# ----------------------------------------------------------------------------------------------- torch.library
def test_opcheck_and_compile():
    p, g, m, v, vmax, steps, _ = _rand_lists([5, 130], "cpu", torch.float32, torch.float32, amsgrad=True)
    args = (p, g, m, v, vmax, steps, [], None, None, 1e-3, None, 0.9, 0.999, 1e-8, 0.0, True, False, False, 0)
    torch.library.opcheck(torch.ops.dlcore.adam_.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))

    def step(params, grads, ms, vs):
        dlcore.functional.adam(params, grads, ms, vs, [], steps, lr=1e-2)

    p2 = [t.clone() for t in p]
    m2, v2 = [t.clone() for t in m], [t.clone() for t in v]
    steps_before = [s.clone() for s in steps]
    torch.compile(step, fullgraph=True, backend="aot_eager")(p, g, m, v)
    steps[:] = steps_before
    dlcore.functional.adam(p2, g, m2, v2, [], steps, lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(p, p2))


# ----------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_capturable_in_cuda_graph():
    net = small_net("cuda", seed=SEED)
    ref = small_net("cuda", seed=SEED)
    opt = dlcore.optim.Adam(net.parameters(), lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    x, y = make_batches(1, "cuda", SEED)[0]
    for n, o in ((net, opt), (ref, opt_ref)):  # warm-up step outside the graph creates the state
        o.zero_grad(set_to_none=False)
        ((n(x) - y) ** 2).mean().backward()
        o.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(5):
        graph.replay()
        opt_ref.step()
    torch.cuda.synchronize()
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
