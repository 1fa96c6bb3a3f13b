"""dlcore.rl.FrameStackReplayBuffer / PrioritizedFrameStackReplayBuffer against a brute-force model: every step's
full stacks and n-step return kept in Python, compared with what the buffer assembles for each sampled slot
(episodes of random lengths, the ring wrapping many times, terminations and truncations, both paddings)."""
import math

import pytest
import torch

import dlcore

from dlcore.rl import FrameStackReplayBuffer, PrioritizedFrameStackReplayBuffer

FRAME = (3, 5)


def _stack(frames, t, stack, padding):
    out = []
    for j in range(t - stack + 1, t + 1):
        if j >= 0:
            out.append(frames[j])
        else:
            out.append(frames[0] if padding == "reset" else torch.zeros_like(frames[0]))
    return torch.stack(out)


def _play(buf, gen, episodes, stack, n, gamma, padding, max_len=12):
    """Feed random episodes; returns {slot: expected sample} for the latest writer of each slot."""
    expected = {}
    for _ in range(episodes):
        length = int(torch.randint(1, max_len, (1,), generator=gen))
        frames = [torch.randint(0, 256, FRAME, generator=gen, dtype=torch.uint8) for _ in range(length + 1)]
        actions = torch.randint(0, 6, (length,), generator=gen)
        rewards = torch.randn(length, generator=gen)
        terminal = bool(torch.rand(1, generator=gen) < 0.5)  # else a time-limit truncation
        for t in range(length):
            last = t == length - 1
            slot = buf.add(_stack(frames, t, stack, padding), int(actions[t]), float(rewards[t]),
                           _stack(frames, t + 1, stack, padding), terminated=last and terminal,
                           truncated=last and not terminal)
            m = min(n, length - t)
            expected[slot] = {
                "obs": _stack(frames, t, stack, padding), "action": int(actions[t]),
                "reward": sum(gamma ** k * float(rewards[t + k]) for k in range(m)),
                "next_obs": _stack(frames, t + m, stack, padding),
                "terminated": float(terminal and t + m == length), "discount": gamma ** m}
    return expected


def _check(batch, expected):
    for b, slot in enumerate(batch["index"].tolist()):
        want = expected[slot]
        assert torch.equal(batch["obs"][b], want["obs"]), slot
        assert torch.equal(batch["next_obs"][b], want["next_obs"]), slot
        assert int(batch["action"][b]) == want["action"]
        assert math.isclose(float(batch["reward"][b]), want["reward"], rel_tol=1e-5, abs_tol=1e-5)
        assert float(batch["terminated"][b]) == want["terminated"]
        assert math.isclose(float(batch["discount"][b]), want["discount"], rel_tol=1e-6)


# frame_stack_sample: torch ops / plan and gather in one C++ call / one Triton kernel (the interpreter here). The op does
# not depend on the class; triton runs with the uniform one only (use_backend would also interpret every sum-tree
# update of the prioritized one, slowly).
@pytest.mark.parametrize("cls,backend", [(FrameStackReplayBuffer, "reference"), (FrameStackReplayBuffer, "cpu"),
                                         (FrameStackReplayBuffer, "triton"),
                                         (PrioritizedFrameStackReplayBuffer, "reference"),
                                         (PrioritizedFrameStackReplayBuffer, "cpu")])
@pytest.mark.parametrize("stack,n,padding", [(4, 1, "reset"), (4, 3, "zero"), (1, 2, "reset"), (3, 5, "reset")])
def test_samples_match_the_full_stacks_and_n_step_returns(cls, stack, n, padding, backend):
    with dlcore.use_backend(backend):  # the interpreter's cost is per program (a batch is B·2·stack of them)
        _samples_match(cls, stack, n, padding, *((1, 12) if backend == "triton" else (5, 64)))


def _samples_match(cls, stack, n, padding, draws, batch):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    gamma = 0.9
    buf = cls(61, frame_shape=FRAME, stack=stack, n_step=n, gamma=gamma, padding=padding, seed=1)
    expected = {}
    for _ in range(6):  # the ring (61 slots) wraps several times between checks
        expected.update(_play(buf, gen, 10, stack, n, gamma, padding))
        for _ in range(draws):
            _check(buf.sample(min(len(buf), batch)), expected)
        drawable = set(torch.nonzero(buf._storage["sampleable"]).squeeze(1).tolist())
        assert drawable <= set(expected) and len(drawable) == len(buf)


def test_frames_are_stored_once():
    buf = FrameStackReplayBuffer(1000, frame_shape=(84, 84))
    assert buf._storage["frame"].numel() == 1000 * 84 * 84  # not 2·4 frames a transition


def test_prioritized_never_draws_overwritten_slots_and_updates_only_live_ones():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    buf = PrioritizedFrameStackReplayBuffer(40, frame_shape=FRAME, stack=4, n_step=2, gamma=0.5, seed=3)
    expected = _play(buf, gen, 8, 4, 2, 0.5, "reset")
    batch = buf.sample(16)
    _check(batch, expected)
    assert torch.all(batch["weight"] > 0) and float(batch["weight"].max()) == 1.0
    expected.update(_play(buf, gen, 8, 4, 2, 0.5, "reset"))  # overwrites most slots the batch came from
    buf.update_priorities(batch["index"], torch.rand(16, generator=gen))
    for _ in range(10):
        _check(buf.sample(16), expected)
    live = buf._storage["sampleable"]
    leaves = buf._tree.leaf_values[:40]
    assert torch.equal(leaves > 0, live)  # a leaf is positive exactly where the slot can be drawn


def test_save_load_round_trip_continues_identically(tmp_path):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    buf = PrioritizedFrameStackReplayBuffer(50, frame_shape=FRAME, n_step=3, seed=5)
    _play(buf, gen, 6, 4, 3, 0.99, "reset")
    buf.add(torch.zeros(FRAME, dtype=torch.uint8), 1, 0.5, None, terminated=False)  # an episode left open
    buf.save(tmp_path / "b.pt")
    other = PrioritizedFrameStackReplayBuffer(50, frame_shape=FRAME, n_step=3, seed=99)
    other.load(tmp_path / "b.pt")
    for b in (buf, other):
        b.add(torch.ones(FRAME, dtype=torch.uint8), 2, 1.0, torch.ones(FRAME, dtype=torch.uint8), terminated=True)
    x, y = buf.sample(8), other.sample(8)
    assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="saved with"):
        PrioritizedFrameStackReplayBuffer(50, frame_shape=FRAME, n_step=2).load(tmp_path / "b.pt")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_or_pickled_buffer_continues_identically_and_independently(how):
    """copy.deepcopy / pickle / torch.save of the buffer object (it held a lock, which neither copies): the copy
    samples what the original samples, and adding to one leaves the other as it was."""
    import copy
    import pickle

    from dlcore.rl import PrioritizedReplayBuffer

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    frames = PrioritizedFrameStackReplayBuffer(50, frame_shape=FRAME, n_step=3, seed=5)
    _play(frames, gen, 6, 4, 3, 0.99, "reset")
    flat = PrioritizedReplayBuffer(20, seed=3)
    for i in range(7):
        flat.add(obs=torch.randn(3, generator=gen), act=torch.tensor(i))
    for buf in (frames, flat):
        other = copy.deepcopy(buf) if how == "deepcopy" else pickle.loads(pickle.dumps(buf))
        x, y = buf.sample(5), other.sample(5)
        assert all(torch.equal(x[k], y[k]) for k in x)
        before = len(buf)
        if buf is flat:
            other.add(obs=torch.zeros(3), act=torch.tensor(0))
        else:
            other.add(torch.ones(FRAME, dtype=torch.uint8), 2, 1.0, None, terminated=False)
        assert len(buf) == before


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="padding"):
        FrameStackReplayBuffer(100, padding="edge")
    with pytest.raises(ValueError, match="capacity"):
        FrameStackReplayBuffer(5, stack=4)
    buf = FrameStackReplayBuffer(100, frame_shape=FRAME)
    with pytest.raises(RuntimeError, match="no transition"):
        buf.sample(1)
    with pytest.raises(ValueError, match="obs must have shape"):
        buf.add(torch.zeros(4, 4, dtype=torch.uint8), 0, 0.0, None, False)
    with pytest.raises(TypeError, match="uint8"):
        buf.add(torch.zeros(FRAME), 0, 0.0, None, False)
    with pytest.raises(TypeError, match="one step at a time"):
        buf.extend(obs=torch.zeros(2, *FRAME))
    frame = torch.zeros(FRAME, dtype=torch.uint8)
    buf.add(frame, 0, 0.0, frame, terminated=True)
    with pytest.raises(ValueError, match="batch_size"):
        buf.sample(2)
    long_episode = FrameStackReplayBuffer(20, frame_shape=FRAME, n_step=1)
    with pytest.raises(ValueError, match="does not fit"):
        for _ in range(30):
            long_episode.add(frame, 0, 0.0, None, False)
    pri = PrioritizedFrameStackReplayBuffer(100, frame_shape=FRAME)
    pri.add(frame, 0, 0.0, frame, terminated=True)
    with pytest.raises(ValueError, match="finite"):
        pri.update_priorities([0], [float("nan")])
    with pytest.raises(IndexError, match="out of range"):
        pri.update_priorities([5], [1.0])

    # the op itself (a caller other than the buffers): a slot outside the ring is refused before anything is written
    from dlcore.rl import frames as frames_op
    st = pri._storage
    for bad in (-1, 100):
        with dlcore.use_backend("cpu"), pytest.raises(IndexError, match="out of range"):
            frames_op.cpu_sample(torch.tensor([0, bad]), st["frame"], st["ended"], st["reward"], st["terminated"],
                                 st["episode_start"], 4, 3, 0.99, False)


@pytest.mark.gpu
def test_cuda_storage_matches_cpu_storage():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    bufs = [FrameStackReplayBuffer(61, frame_shape=FRAME, n_step=3, gamma=0.9, seed=4, device=d)
            for d in ("cpu", "cuda")]
    state = gen.get_state()
    expected = _play(bufs[0], gen, 12, 4, 3, 0.9, "reset")
    gen.set_state(state)
    _play(bufs[1], gen, 12, 4, 3, 0.9, "reset")
    cpu, gpu = bufs[0].sample(32), bufs[1].sample(32)
    _check(cpu, expected)
    for k in cpu:
        assert torch.equal(cpu[k], gpu[k].cpu()), k
