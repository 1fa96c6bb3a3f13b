"""dlcore.rl: the sum-tree ops (numba CPU kernel against the plain-PyTorch reference) and the replay buffers:
sampling frequencies (chi-square), importance weights, drift, bad input, seeding, persistence, threads."""
import math
import os
import threading
import time

import pytest
import torch

import dlcore
from dlcore import _dispatch
from dlcore.rl import PrioritizedReplayBuffer, ReplayBuffer, SumTree
from dlcore.rl import sum_tree as st
from dlcore.testing import backend_device_pairs

SEED = int(os.environ.get("DLCORE_TEST_SEED", int(time.time() * 1000) % 2**31))
BACKENDS = [b for b, d in backend_device_pairs(st.UPDATE_OP, torch.float64) if d == "cpu"]


def _random_updates(tree_capacity, n_batches, batch, gen):
    for _ in range(n_batches):
        index = torch.randint(0, tree_capacity, (batch,), generator=gen)
        value = torch.rand(batch, generator=gen, dtype=torch.float64) * 10
        value[torch.rand(batch, generator=gen) < 0.1] = 0.0
        yield index, value


def _find(tree, mass):
    """The leaf holding each mass, through the stratified sampler: stratum b's offset is chosen so that
    (b + offset_b)·total/B = mass_b (the kernels do not require offsets in [0, 1))."""
    batch = mass.numel()
    offsets = mass * batch / tree.total - torch.arange(batch, dtype=torch.float64)
    return tree.sample(offsets, 0.0)[0]


# (batches from 128 on: the C++ update splits the leaves over two threads at a node edge; 300_001 has three
# levels recomputed per touched node and the split at 150_016)
@pytest.mark.parametrize("capacity,batch", [(1, 37), (7, 37), (129, 37), (1000, 37), (70_001, 259), (300_001, 512)])
def test_update_kernels_agree_exactly_with_duplicates(capacity, batch):
    gen = torch.Generator().manual_seed(SEED)
    trees = {b: SumTree(capacity) for b in BACKENDS}
    written = {}
    for index, value in _random_updates(capacity, 20, batch, gen):
        index[:5] = index[0]  # duplicates in one batch: the last write wins
        written.update(zip(index.tolist(), value.tolist()))
        for backend, tree in trees.items():
            with dlcore.use_backend(backend):
                tree.update(index, value)
    ref = trees["reference"]
    for backend, tree in trees.items():
        assert torch.equal(tree.sum, ref.sum) and torch.equal(tree.min, ref.min), backend
    leaves = ref.leaf_values
    assert all(leaves[i].item() == v for i, v in written.items())
    assert math.isclose(ref.total, math.fsum(written.values()), rel_tol=1e-12)
    # unwritten leaves and leaves written with 0 (never drawn) hold +inf in the min tree
    assert ref.min_leaf == min([v for v in written.values() if v > 0], default=float("inf"))


def test_float32_priorities_give_the_trees_of_their_float64_values():
    """fp32 TD errors go to the kernels unconverted; each widens them exactly, so the trees (and the returned
    max) are those of the same values given as float64, on every backend; bad fp32 values are still refused."""
    gen = torch.Generator().manual_seed(SEED)
    index = torch.randint(0, 1000, (300,), generator=gen)
    narrow = torch.rand(300, generator=gen) * 3
    for backend in BACKENDS:
        a, b = SumTree(1000), SumTree(1000)
        with dlcore.use_backend(backend):
            top_a = a.update(index, narrow, eps=1e-6, alpha=0.6)
            top_b = b.update(index, narrow.double(), eps=1e-6, alpha=0.6)
            assert top_a == top_b, backend
            assert torch.equal(a.sum, b.sum) and torch.equal(a.min, b.min), backend
            with pytest.raises(ValueError, match="finite and non-negative"):
                a.update(index[:3], torch.tensor([1.0, float("nan"), 2.0]))
            assert torch.equal(a.sum, b.sum), backend  # nothing written


def test_total_does_not_drift_after_a_million_updates():
    gen = torch.Generator().manual_seed(SEED)
    tree = SumTree(1 << 16)
    for index, value in _random_updates(1 << 16, 1000, 1000, gen):
        tree.update(index, value)
    leaves = tree.leaf_values
    assert math.isclose(tree.total, math.fsum(leaves.tolist()), rel_tol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_find_respects_prefix_sums_and_skips_empty_leaves(backend):
    gen = torch.Generator().manual_seed(SEED)
    tree = SumTree(1000)
    index = torch.arange(0, 1000, 3)
    tree.update(index, torch.rand(index.numel(), generator=gen, dtype=torch.float64) + 0.01)
    mass = torch.rand(2000, generator=gen, dtype=torch.float64) * tree.total
    mass[:3] = torch.tensor([0.0, tree.total, tree.total * (1 - 1e-16)])
    with dlcore.use_backend(backend):
        found = _find(tree, mass)
    leaves = tree.leaf_values
    assert (leaves[found] > 0).all(), "an empty (unwritten) leaf was returned"
    prefix = torch.cumsum(leaves, 0) - leaves
    inside = (prefix[found] <= mass + 1e-9) & (mass < prefix[found] + leaves[found] + 1e-9)
    assert inside[3:].all()


def _chi_square_p(counts, expected):
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("seed_offset", [0, 1, 2])
def test_sampling_frequencies_match_priorities(seed_offset):
    n = 40
    buf = PrioritizedReplayBuffer(64, alpha=0.7, seed=SEED + seed_offset)
    buf.extend(x=torch.arange(n, dtype=torch.float32))
    gen = torch.Generator().manual_seed(SEED + seed_offset)
    priority = torch.rand(n, generator=gen, dtype=torch.float64) * 5
    buf.update_priorities(torch.arange(n), priority)
    counts = torch.zeros(n, dtype=torch.float64)
    draws = 0
    for _ in range(500):
        idx = buf.sample(n)["index"]
        counts += torch.bincount(idx, minlength=n).double()
        draws += n
    p = (priority + buf.eps) ** 0.7
    expected = p / p.sum() * draws
    assert _chi_square_p(counts, expected) > 1e-4, f"seed {SEED + seed_offset}"


def test_importance_weights_match_the_formula():
    buf = PrioritizedReplayBuffer(100, alpha=0.6, beta=0.5, seed=SEED)
    buf.extend(x=torch.randn(30, 3))
    pr = torch.rand(30, dtype=torch.float64) + 0.1
    buf.update_priorities(torch.arange(30), pr)
    out = buf.sample(16)
    P = (pr + buf.eps) ** 0.6
    P = P / P.sum()
    w = (30 * P[out["index"]]) ** -0.5
    w_max = (30 * P.min()) ** -0.5
    assert torch.allclose(out["weight"].double(), w / w_max, rtol=1e-5)
    assert (out["weight"] <= 1 + 1e-6).all()


def test_beta_anneals_linearly():
    buf = PrioritizedReplayBuffer(10, beta=0.4, beta_final=1.0, beta_steps=4, seed=0)
    buf.extend(x=torch.zeros(5))
    betas = []
    for _ in range(6):
        betas.append(buf.beta)
        buf.sample(2)
    assert betas == pytest.approx([0.4, 0.55, 0.7, 0.85, 1.0, 1.0])


@pytest.mark.parametrize("cls", [ReplayBuffer, PrioritizedReplayBuffer])
def test_never_returns_unwritten_slots_and_wraps_around(cls):
    buf = cls(100, seed=SEED)
    buf.extend(obs=torch.randn(7, 4), action=torch.arange(7))
    for _ in range(50):
        assert (buf.sample(7)["index"] < 7).all()
    small = cls(5, seed=SEED)
    small.extend(v=torch.arange(12))
    assert len(small) == 5
    assert sorted(small._storage["v"].tolist()) == [7, 8, 9, 10, 11]
    got = small.sample(5)
    assert torch.equal(got["v"], small._storage["v"][got["index"]])


def test_add_single_transitions_and_field_spec():
    buf = ReplayBuffer(10, fields={"obs": ((2, 3), torch.float32), "done": ((), torch.bool)}, seed=1)
    slot = buf.add(obs=torch.ones(2, 3), done=True)
    assert slot.tolist() == [0] and len(buf) == 1
    assert buf.fields == {"obs": ((2, 3), torch.float32), "done": ((), torch.bool)}


def test_bad_input_errors():
    buf = PrioritizedReplayBuffer(10, seed=0)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(1)
    buf.extend(obs=torch.randn(4, 3), action=torch.arange(4))
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 4\]"):
        buf.sample(5)
    with pytest.raises(ValueError, match="non-negative"):
        buf.update_priorities([0], [-1.0])
    with pytest.raises(ValueError, match="finite"):
        buf.update_priorities([0], [float("nan")])
    with pytest.raises(IndexError, match="out of range"):
        buf.update_priorities([4], [1.0])
    with pytest.raises(ValueError, match="field 'obs' has shape"):
        buf.extend(obs=torch.randn(2, 5), action=torch.arange(2))
    with pytest.raises(TypeError, match="field 'action' is torch.float32"):
        buf.extend(obs=torch.randn(2, 3), action=torch.rand(2))
    with pytest.raises(KeyError, match="differ"):
        buf.extend(obs=torch.randn(2, 3))
    with pytest.raises(ValueError, match="has 3 transitions"):
        buf.extend(obs=torch.randn(2, 3), action=torch.arange(3))
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    with pytest.raises(IndexError, match="out of range"):
        SumTree(4).update(torch.tensor([4]), torch.tensor([1.0]))
    before = buf._tree.sum.clone()
    for bad_index in (torch.tensor([0.7]), [1.5], torch.tensor([True])):  # never truncated to a position
        with pytest.raises(TypeError, match="index must hold integer positions"):
            buf.update_priorities(bad_index, [1.0])
    assert torch.equal(buf._tree.sum, before)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
            buf.sample(2, beta=beta)


@pytest.mark.parametrize("cls", [ReplayBuffer, PrioritizedReplayBuffer])
def test_seeded_reproducible_and_exact_save_load(cls, tmp_path):
    def filled(seed):
        b = cls(50, seed=seed)
        b.extend(obs=torch.arange(120, dtype=torch.float32).reshape(40, 3), r=torch.arange(40))
        return b

    a, b = filled(3), filled(3)
    assert torch.equal(a.sample(8)["index"], b.sample(8)["index"])
    torch.manual_seed(SEED)
    c = cls(50)
    torch.manual_seed(SEED)
    d = cls(50)
    for buf in (c, d):
        buf.extend(x=torch.arange(10))
    assert torch.equal(c.sample(5)["index"], d.sample(5)["index"])
    if cls is PrioritizedReplayBuffer:
        a.update_priorities(torch.arange(10), torch.rand(10))
    a.save(tmp_path / "buf.pt")
    restored = cls(50, seed=999)
    restored.load(tmp_path / "buf.pt")
    assert len(restored) == len(a)
    for name in a.fields:
        assert torch.equal(restored._storage[name], a._storage[name])
    x, y = a.sample(16), restored.sample(16)
    assert all(torch.equal(x[k], y[k]) for k in x)
    if cls is PrioritizedReplayBuffer:  # a state saved before the Philox draws (no draw_seed) still loads and samples
        old_state = a.state_dict()
        del old_state["draw_seed"]
        older = cls(50, seed=999)
        older.load_state_dict(old_state)
        assert older.sample(4)["index"].numel() == 4 and older.state_dict()["draw_seed"] >= 0
    if cls is PrioritizedReplayBuffer:  # trees of another layout (the binary one before 8-ary) are refused, not misread
        state = a.state_dict()
        state["tree_sum"], state["tree_min"] = torch.zeros(128, dtype=torch.float64), torch.zeros(128)
        before = restored.state_dict()
        with pytest.raises(ValueError, match="layout"):
            restored.load_state_dict(state)
        after = restored.state_dict()  # nothing replaced
        assert torch.equal(after["tree_sum"], before["tree_sum"]) and after["size"] == before["size"]
        assert all(torch.equal(after["storage"][k], v) for k, v in before["storage"].items())


def test_a_state_of_another_kind_or_capacity_is_refused_before_anything_is_replaced():
    from dlcore.rl import FrameStackReplayBuffer, PrioritizedFrameStackReplayBuffer

    def filled(buf):
        if isinstance(buf, FrameStackReplayBuffer):
            for t in range(6):
                frame = torch.full((2, 2), t, dtype=torch.uint8)
                buf.add(frame, t, 1.0, frame + 1, terminated=t == 5)
        else:
            buf.extend(obs=torch.randn(6, 3))
        return buf

    kinds = [ReplayBuffer, PrioritizedReplayBuffer, lambda c: FrameStackReplayBuffer(c, frame_shape=(2, 2)),
             lambda c: PrioritizedFrameStackReplayBuffer(c, frame_shape=(2, 2))]
    cases = [(1, 0, "sum-tree"), (2, 0, "no episodes"), (3, 1, "no episodes"), (3, 2, "sum-tree"),
             (0, 0, "capacity"), (1, 1, "capacity"), (3, 3, "capacity")]
    for into, saved, message in cases:
        target = filled(kinds[into](32))
        state = filled(kinds[saved](32 if message != "capacity" else 16)).state_dict()
        before = target.state_dict()
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(state)
        after = target.state_dict()
        assert after["size"] == before["size"] and after["pos"] == before["pos"]
        assert all(torch.equal(after["storage"][k], v) for k, v in before["storage"].items())
    filled(kinds[0](16)).load_state_dict(filled(kinds[1](16)).state_dict())  # priorities dropped: loads


def test_a_device_that_cannot_hold_tensors_is_refused_at_construction():
    device = "cuda" if not torch.cuda.is_available() else "cuda:99"
    with pytest.raises(ValueError, match="device="):
        ReplayBuffer(8, device=device)
    with pytest.raises(ValueError, match="device="):
        PrioritizedReplayBuffer(8, device=device)


def test_actor_adds_while_learner_samples():
    buf = PrioritizedReplayBuffer(500, seed=SEED)
    buf.extend(obs=torch.zeros(1, 4), action=torch.zeros(1, dtype=torch.int64))
    errors, stop = [], threading.Event()

    def actor():
        try:
            for i in range(300):
                buf.extend(obs=torch.full((3, 4), float(i)), action=torch.full((3,), i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=actor)
    thread.start()
    n = 0
    while not stop.is_set() or n < 50:
        out = buf.sample(min(len(buf), 32))
        buf.update_priorities(out["index"], torch.rand(out["index"].numel()))
        assert torch.isfinite(out["weight"]).all()
        assert torch.equal(out["obs"][:, 0].long(), out["action"])  # rows are never torn
        n += 1
    thread.join()
    assert not errors and len(buf) == 500


def test_backends_sample_the_same_leaves_and_weights():
    gen = torch.Generator().manual_seed(SEED)
    tree = SumTree(3000)
    tree.update(torch.arange(0, 3000, 2), torch.rand(1500, generator=gen, dtype=torch.float64) + 1e-3)
    offsets = torch.rand(300, generator=gen, dtype=torch.float64)
    results = {}
    for backend in BACKENDS:
        with dlcore.use_backend(backend):
            results[backend] = tree.sample(offsets, 0.6)
    ref_index, ref_weight = results.pop("reference")
    for backend, (index, weight) in results.items():
        same = index == ref_index  # may differ only where a mass sits on a boundary, within float rounding
        assert same.float().mean() > 0.99, backend
        assert torch.allclose(weight[same], ref_weight[same], rtol=1e-12), backend
    # the tree's own descents (C++, numba, Triton) take the binary tree's decisions from the same sums: same leaves
    descents = [results[b][0] for b in ("cpu", "numba", "triton") if b in results]
    assert all(torch.equal(d, descents[0]) for d in descents)
    if "cpu" in results and "numba" in results:  # same formula, same libm: bit for bit
        assert torch.equal(results["cpu"][1], results["numba"][1])


@pytest.mark.parametrize("row_shape,dtype", [((4,), torch.float32), ((), torch.int64), ((3, 67), torch.uint8)])
def test_sample_gather_equals_sample_then_rows(row_shape, dtype):
    """The fused op (triton: one kernel, descent and row copies; cpu: one C++ call; numba: its descent + the C++
    gather) against sample()
    followed by index_select, on every backend; rows of 201 bytes span several of the kernel's 64-byte pieces."""
    gen = torch.Generator().manual_seed(SEED)
    tree = SumTree(1000)
    tree.update(torch.arange(0, 1000, 3), torch.rand(334, generator=gen, dtype=torch.float64) + 1e-3)
    sources = [(torch.rand((1000, *row_shape), generator=gen) * 100).to(dtype),
               torch.randn(1000, 2, generator=gen, dtype=torch.float64)]
    for batch in (1, 77, 301):  # from 128 draws on, the C++ call splits draws and rows over two threads
        offsets = torch.rand(batch, generator=gen, dtype=torch.float64)
        for backend in BACKENDS:
            with dlcore.use_backend(backend):
                index, weight = tree.sample(offsets, 0.4)
                fused_index, fused_weight, rows = tree.sample_gather(offsets, 0.4, sources)
                weight32 = tree.sample_gather(offsets, 0.4, sources, weight_dtype=torch.float32)[1]
            assert torch.equal(fused_index, index) and torch.equal(fused_weight, weight), backend
            # float32 weights (the buffer's): the float64 weight rounded once, however the backend writes it
            assert weight32.dtype == torch.float32 and torch.equal(weight32, weight.float()), backend
            for source, got in zip(sources, rows):
                assert got.dtype == source.dtype and torch.equal(got, source.index_select(0, index)), backend
    with pytest.raises(TypeError, match="weight_dtype"):
        tree.sample_gather(offsets, 0.4, sources, weight_dtype=torch.float16)


@pytest.mark.parametrize("n", [1, 7, 129, 1000])
def test_draw_offsets_are_philox_uniforms_bit_for_bit(n):
    """The C++ offsets (sum_tree_draw_offsets, and the ones sum_tree_sample_gather draws itself) are the doubles of
    the plain-PyTorch Philox (dlcore._philox.uniform53), counters past 2³² included; they lie in [0, 1), their mean
    is 1/2 within 5 standard errors, and neighbouring draws differ."""
    from dlcore._philox import uniform53

    gen = torch.Generator().manual_seed(SEED)
    seeds = [0, 2**62 - 1, int(torch.randint(0, 2**62, (1,), generator=gen))]
    counters = [0, 1, 2**32 + 3, int(torch.randint(0, 2**40, (1,), generator=gen))]
    for seed in seeds:
        for counter in counters:
            ref = uniform53(seed, counter, n)
            assert ref.dtype == torch.float64 and bool(((ref >= 0) & (ref < 1)).all())
            if _ext_cpu_ok():
                got = st.draw_offsets(seed, counter, n)
                assert torch.equal(got, ref), (seed, counter)
            assert not torch.equal(ref, uniform53(seed, counter + 1, n)) or n == 1 and ref[0] == 0
    many = uniform53(seeds[2], counters[3], 200_000)
    assert abs(float(many.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / many.numel())
    assert torch.unique(many).numel() == many.numel()


def _ext_cpu_ok():
    from dlcore import _ext

    return _ext.cpu_unavailable() is None


@pytest.mark.parametrize("batch", [1, 77, 256])
def test_buffer_sample_is_the_same_draw_on_every_backend(batch):
    """A buffer's sample k is the fused op on draw_offsets(seed, k): the cpu and triton kernels (and cuda's) draw
    the offsets themselves (a Draw), the others take them as a tensor; on each backend the result equals its own
    sample_gather of draw_offsets' tensor, and every backend draws the same leaves and rows."""
    gen = torch.Generator().manual_seed(SEED)
    n = 3000
    fields = dict(obs=torch.randn(n, 3, generator=gen), action=torch.randint(0, 9, (n,), generator=gen),
                  frame=torch.randint(0, 256, (n, 5, 7), generator=gen, dtype=torch.uint8))
    priority = torch.rand(n, generator=gen, dtype=torch.float64)
    priority[torch.rand(n, generator=gen) < 0.2] = 0.0
    results = {}
    for backend in BACKENDS:
        buf = PrioritizedReplayBuffer(n, seed=SEED, eps=0.0)  # (eps 0: a zero priority is a zero leaf, never drawn)
        buf.extend(**fields)
        buf.update_priorities(torch.arange(n), priority)
        sources = list(buf._storage.values())
        with dlcore.use_backend(backend):
            results[backend] = [buf.sample(batch) for _ in range(3)]
            for k, out in enumerate(results[backend]):
                index, weight, rows = buf._tree.sample_gather(st.draw_offsets(buf._draw_seed, k, batch), buf.beta,
                                                              sources, weight_dtype=torch.float32)
                assert torch.equal(out["index"], index) and torch.equal(out["weight"], weight), backend
                assert all(torch.equal(out[name], r) for name, r in zip(buf._storage, rows)), backend
                assert bool((priority[out["index"]] > 0).all())
    first = results.pop(BACKENDS[0])
    for backend, outs in results.items():
        for a, b in zip(first, outs):
            same = a["index"] == b["index"]  # the reference's cumsum may differ at a boundary by rounding
            assert same.float().mean() > 0.95 and torch.equal(a["obs"][same], b["obs"][same]), backend
            assert torch.allclose(a["weight"][same], b["weight"][same], rtol=1e-6), backend


def test_sample_drawn_is_sample_of_the_drawn_offsets():
    """SumTree.sample_drawn (the frame-stack buffers' draw): the cpu and triton kernels draw the offsets themselves,
    numba and the reference are given them; each equals its own sample() of draw_offsets' tensor."""
    gen = torch.Generator().manual_seed(SEED)
    tree = SumTree(5000)
    tree.update(torch.arange(0, 5000, 3), torch.rand(1667, generator=gen, dtype=torch.float64) + 1e-3)
    seed, counter = int(torch.randint(0, 2**62, (1,), generator=gen)), int(torch.randint(0, 2**40, (1,), generator=gen))
    for batch in (1, 33, 300):
        for backend in BACKENDS:
            with dlcore.use_backend(backend):
                index, weight = tree.sample_drawn(seed, counter, batch, 0.5)
                ref_index, ref_weight = tree.sample(st.draw_offsets(seed, counter, batch), 0.5)
            assert torch.equal(index, ref_index) and torch.equal(weight, ref_weight), backend
            assert bool((index % 3 == 0).all()), backend


def test_copied_or_restored_buffer_samples_its_own_storage():
    """The CPU sample keeps its storage's addresses between calls; a deepcopy, a pickle round trip and a
    load_state_dict (storage replaced) must sample their own rows, not the original's (overwritten after the copy)."""
    import copy
    import pickle

    buf = PrioritizedReplayBuffer(64, seed=SEED)
    buf.extend(obs=torch.arange(64.0)[:, None].repeat(1, 2), tag=torch.arange(64))
    buf.sample(8)  # the addresses are taken
    clones = [copy.deepcopy(buf), pickle.loads(pickle.dumps(buf))]
    restored = PrioritizedReplayBuffer(64, seed=SEED)
    restored.extend(obs=torch.zeros(64, 2), tag=torch.zeros(64, dtype=torch.int64))
    restored.sample(8)
    restored.load_state_dict(buf.state_dict())
    clones.append(restored)
    buf.extend(obs=torch.full((64, 2), -1.0), tag=torch.full((64,), -1))  # the original's rows all overwritten
    assert bool((buf.sample(16)["tag"] == -1).all())
    older = buf.__getstate__()  # a buffer pickled before the cached addresses and the Philox draws existed
    del older["_plan"], older["_draw_seed"]
    unpickled = PrioritizedReplayBuffer.__new__(PrioritizedReplayBuffer)
    unpickled.__setstate__(copy.deepcopy(older))
    assert unpickled.sample(4)["tag"].numel() == 4
    for clone in clones:
        out = clone.sample(16)
        assert torch.equal(out["tag"], out["index"]) and torch.equal(out["obs"][:, 0], out["index"].float())


def test_sample_gather_refuses_a_source_shorter_than_the_drawn_leaves():
    """A leaf drawn past the shortest source's rows is an IndexError on every backend (never a read past it)."""
    tree = SumTree(64)
    tree.update(torch.arange(40, 64), torch.ones(24, dtype=torch.float64))  # only leaves 40..63 can be drawn
    sources = [torch.zeros(64, 3), torch.zeros(40, dtype=torch.int64)]  # the second stops at row 39
    offsets = torch.rand(7, dtype=torch.float64)
    for backend in BACKENDS:
        with dlcore.use_backend(backend), pytest.raises(IndexError, match="40 rows"):
            tree.sample_gather(offsets, 0.4, sources)
    impls = _dispatch.get_op(st.SAMPLE_GATHER_OP).impls
    for backend in ("cpu", "numba", "reference"):  # these check the drawn rows themselves too (GPU kernels do not)
        if backend in BACKENDS:
            with pytest.raises(IndexError):
                impls[backend].fn(tree.sum, tree.min, tree.levels, offsets, 0.4, sources)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_buffer_matches_cpu_buffer(backend):
    """Same seed, same draws: the GPU kernels draw the offsets themselves (Philox, as the C++ does)."""
    bufs = [PrioritizedReplayBuffer(5000, device=d, seed=SEED) for d in ("cpu", "cuda")]
    gen = torch.Generator().manual_seed(SEED)
    obs, prio = torch.randn(4000, 4, generator=gen), torch.rand(4000, generator=gen)
    for b in bufs:
        b.extend(obs=obs, action=torch.arange(4000))
        b.update_priorities(torch.arange(4000), prio)
    cpu_out = bufs[0].sample(256)
    with dlcore.use_backend(backend):
        gpu_out = bufs[1].sample(256)
    same = cpu_out["index"] == gpu_out["index"].cpu()
    assert same.float().mean() > 0.99
    assert torch.equal(gpu_out["obs"].cpu()[same], cpu_out["obs"][same])
    assert torch.allclose(gpu_out["weight"].cpu()[same], cpu_out["weight"][same])
    assert torch.allclose(bufs[1]._tree.sum.cpu(), bufs[0]._tree.sum, rtol=1e-12)


@pytest.mark.gpu
def test_gpu_buffer_with_more_fields_than_the_cuda_kernel_takes():
    """17 fields: past the CUDA kernel's 16 (addresses passed as kernel parameters), the Triton kernel gathers."""
    fields = {f"f{k}": torch.arange(300 * (k + 1), dtype=torch.float32).reshape(300, k + 1) for k in range(17)}
    bufs = [PrioritizedReplayBuffer(300, device=d, seed=SEED) for d in ("cpu", "cuda")]
    for b in bufs:
        b.extend(**{k: v.to(b.device) for k, v in fields.items()})
    cpu_out, gpu_out = (b.sample(64) for b in bufs)
    assert torch.equal(gpu_out["index"].cpu(), cpu_out["index"])
    assert all(torch.equal(gpu_out[k].cpu(), cpu_out[k]) for k in fields)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_tree_kernels_match_the_reference(backend):
    gen = torch.Generator().manual_seed(SEED)
    ref, gpu = SumTree(3000), SumTree(3000, "cuda")
    for index, value in _random_updates(3000, 10, 500, gen):
        index[:7] = index[0]  # duplicates: the last write wins
        ref.update(index, value)
        with dlcore.use_backend(backend):
            gpu.update(index.cuda(), value.cuda())
    assert torch.equal(gpu.sum.cpu(), ref.sum) and torch.equal(gpu.min.cpu(), ref.min)
    offsets = torch.rand(1000, generator=gen, dtype=torch.float64)
    want_index, want_weight = ref.sample(offsets, 0.5)
    with dlcore.use_backend(backend):
        index, weight = gpu.sample(offsets, 0.5)
        source = torch.randn(3000, 5, device="cuda")
        fused_index, fused_weight, (rows,) = gpu.sample_gather(offsets, 0.5, [source])
    same = index.cpu() == want_index
    assert same.float().mean() > 0.99
    assert torch.allclose(weight.cpu()[same], want_weight[same], rtol=1e-12)
    assert torch.equal(fused_index, index) and torch.equal(fused_weight, weight)
    assert torch.equal(rows, source.index_select(0, index))


def test_n_step_returns_stop_at_episode_ends():
    from dlcore.rl import NStepWriter

    buf = ReplayBuffer(100, seed=0)
    writer = NStepWriter(buf, n=3, gamma=0.5, num_envs=2)
    # env 0: rewards 1..5, done at the 5th step; env 1: rewards 10, 20, done at its 2nd step, then 30, 40, 50
    rewards = [(1, 10), (2, 20), (3, 30), (4, 40), (5, 50)]
    dones = [(False, False), (False, True), (False, False), (False, False), (True, False)]
    emitted = []
    for t, (r, d) in enumerate(zip(rewards, dones)):
        obs = torch.tensor([[t, 0.0], [t, 1.0]])
        emitted.append(writer.step(obs, torch.tensor([t, t]), torch.tensor(r, dtype=torch.float32), obs + 100,
                                   torch.tensor(d)))
    got = {(int(o[1]), int(o[0])): (float(r), bool(d), float(g), int(n[0]))
           for o, r, d, g, n in zip(buf._storage["obs"][:len(buf)], buf._storage["reward"][:len(buf)],
                                    buf._storage["done"][:len(buf)], buf._storage["discount"][:len(buf)],
                                    buf._storage["next_obs"][:len(buf)])}
    # (env, t): (n-step reward, done, discount, t of next_obs - 100)
    assert got[(0, 0)] == (1 + 0.5 * 2 + 0.25 * 3, False, 0.125, 102)
    assert got[(0, 1)] == (2 + 0.5 * 3 + 0.25 * 4, False, 0.125, 103)
    assert got[(0, 2)] == (3 + 0.5 * 4 + 0.25 * 5, True, 0.125, 104)
    assert got[(0, 3)] == (4 + 0.5 * 5, True, 0.25, 104)
    assert got[(0, 4)] == (5, True, 0.5, 104)
    assert got[(1, 0)] == (10 + 0.5 * 20, True, 0.25, 101)
    assert got[(1, 1)] == (20, True, 0.5, 101)
    assert got[(1, 2)] == (30 + 0.5 * 40 + 0.25 * 50, False, 0.125, 104)
    assert len(buf) == 8 and sum(emitted) == 8
    with pytest.raises(ValueError, match="num_envs=2"):
        writer.step(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="truncated must have a leading dimension"):
        writer.step(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2), torch.zeros(2, 2), torch.zeros(2),
                    torch.zeros(3))


def test_n_step_returns_of_a_truncated_episode_still_bootstrap():
    from dlcore.rl import NStepWriter

    buf = ReplayBuffer(100, seed=0)
    writer = NStepWriter(buf, n=3, gamma=0.5)
    # rewards 1, 2 then a time limit (truncated, not terminated), then a new episode: 4, 8, 16 (terminated)
    steps = [(1, False, False), (2, False, True), (4, False, False), (8, False, False), (16, True, False)]
    for t, (r, terminated, truncated) in enumerate(steps):
        writer.step(torch.tensor([[float(t)]]), torch.tensor([t]), torch.tensor([float(r)]),
                    torch.tensor([[t + 100.0]]), torch.tensor([terminated]), torch.tensor([truncated]))
    got = {int(o): (float(r), bool(d), float(g), int(n)) for o, r, d, g, n in
           zip(*(buf._storage[k][:len(buf)].flatten() for k in ("obs", "reward", "done", "discount", "next_obs")))}
    # t: (n-step reward, done, discount, next_obs); the truncated episode's windows end at its last step, done False
    assert got == {0: (1 + 0.5 * 2, False, 0.25, 101), 1: (2, False, 0.5, 101),
                   2: (4 + 0.5 * 8 + 0.25 * 16, True, 0.125, 104), 3: (8 + 0.5 * 16, True, 0.25, 104),
                   4: (16, True, 0.5, 104)}


def test_repr_names_the_settings():
    from dlcore.rl import PrioritizedFrameStackReplayBuffer

    buf = PrioritizedReplayBuffer(100, alpha=0.7, beta_steps=50)
    assert repr(buf) == ("PrioritizedReplayBuffer(capacity=100, size=0, device=cpu, fields={}, alpha=0.7, "
                         "beta=0.4 (0.4 → 1.0 over 50 samples), eps=1e-06)")
    buf.extend(obs=torch.zeros(3, 4), action=torch.zeros(3, dtype=torch.int64))
    assert "size=3" in repr(buf) and "fields={obs: (4,) float32, action: () int64}" in repr(buf)
    assert repr(ReplayBuffer(7)) == "ReplayBuffer(capacity=7, size=0, device=cpu, fields={})"
    frames = repr(PrioritizedFrameStackReplayBuffer(100, frame_shape=(8, 8), n_step=3))
    assert frames.startswith("PrioritizedFrameStackReplayBuffer(capacity=100, size=0, device=cpu, alpha=0.6")
    assert "frame_shape=(8, 8), stack=4, n_step=3" in frames and "fields" not in frames
    assert repr(SumTree(10)) == "SumTree(capacity=10, device=cpu)"
