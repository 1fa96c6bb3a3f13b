"""dlcore.models.dqn: the networks against their stock twins, the TD target formula, and short training runs
(checkpoint, resume, outputs) through `dlcore train dqn`. The full CartPole solve is a README command, not a test."""
import json
import os

import pytest
import torch

from dlcore import cli, registry
from dlcore.models import dqn

SEED = int(os.environ.get("DLCORE_TEST_SEED", 0))


@pytest.mark.parametrize("make", [lambda stock: dqn.QMLP(4, 2, (7, 129), stock=stock),
                                  lambda stock: dqn.QConvNet(6, 4, "2013", stock=stock),
                                  lambda stock: dqn.QConvNet(3, 4, "nature", stock=stock)])
def test_network_matches_stock_twin(make):
    torch.manual_seed(SEED)
    net, twin = make(False), make(True)
    assert net.state_dict().keys() == twin.state_dict().keys()
    twin.load_state_dict(net.state_dict())
    conv = isinstance(net, dqn.QConvNet)
    x = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8) if conv else torch.randn(5, 4)
    out, ref = net(x), twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(net.parameters()), g)
    ref_grads = torch.autograd.grad(ref, list(twin.parameters()), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("double", [True, False])
def test_td_targets_formula(double):
    torch.manual_seed(SEED)
    q_net, target_net = dqn.QMLP(3, 4, (8,)), dqn.QMLP(3, 4, (8,))
    batch = {"next_obs": torch.randn(9, 3), "reward": torch.randn(9), "terminated": (torch.rand(9) < 0.3).float()}
    y = dqn.td_targets(q_net, target_net, batch, 0.9, double)
    with torch.no_grad():
        tq = target_net(batch["next_obs"])
        chooser = q_net(batch["next_obs"]) if double else tq
        for i in range(9):
            a = int(chooser[i].argmax())
            want = batch["reward"][i] + 0.9 * (1 - batch["terminated"][i]) * tq[i, a]
            assert abs(float(y[i]) - float(want)) < 1e-5


def test_epsilon_schedule():
    cfg = dqn.DQNConfig(steps=1000, eps_start=1.0, eps_final=0.1, eps_fraction=0.5)
    assert dqn.epsilon(cfg, 0) == 1.0 and abs(dqn.epsilon(cfg, 250) - 0.55) < 1e-9 and dqn.epsilon(cfg, 900) == 0.1


def test_train_refuses_an_unknown_environment(tmp_path, capsys):
    """A clear error before any training (it was gymnasium's traceback from inside train())."""
    pytest.importorskip("gymnasium")
    assert cli.main(["train", "dqn", "--env", "NoSuchEnv-v0", "--out", str(tmp_path / "run")]) == 2
    assert "unknown gymnasium environment 'NoSuchEnv-v0'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("prioritized", [False, True])
def test_train_checkpoint_resume(tmp_path, prioritized):
    pytest.importorskip("gymnasium")
    out = str(tmp_path / "run")
    argv = ["train", "dqn", "--steps", "600", "--learning-starts", "100", "--train-every", "100",
            "--gradient-steps", "4", "--batch", "16", "--hidden", "16", "--eval-every", "300", "--eval-episodes", "2",
            "--solve-episodes", "0", "--checkpoint-every", "300", "--out", out, "--no-progress"]
    if prioritized:
        argv.append("--prioritized")
    assert cli.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["gradient_steps"] == 20 and summary["episodes"] > 0
    for name in ("returns.csv", "returns.png", "checkpoint.pt", "q_net.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 600
    # resume: a longer run continues from step 600 with the same buffer and counters
    assert cli.main(argv[:3] + ["900"] + argv[4:] + ["--resume"]) == 0
    resumed = json.load(open(os.path.join(out, "summary.json")))
    assert resumed["gradient_steps"] == 32
    assert len(torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["buffer"]["storage"]["obs"]) \
        == dqn.DQNConfig().buffer


def test_observations_neither_vectors_nor_frame_stacks_are_refused(monkeypatch):
    class Box:
        shape = (84, 84)

    class Space:
        n = 6

    class Env:
        observation_space, action_space = Box(), Space()

    monkeypatch.setattr(dqn, "_make_env", lambda name: Env())
    with pytest.raises(ValueError, match=r"observations of shape \(84, 84\)"):
        dqn.train(dqn.DQNConfig(env="Odd-v0", progress=False, out="/tmp/dlcore-dqn-odd"))


def test_atari_defaults_apply_unless_overridden():
    cfg = dqn.DQNConfig.for_env("ALE/Pong-v5", lr=3e-4)
    assert cfg.prioritized and cfg.n_step == 3 and cfg.buffer == 100_000 and cfg.lr == 3e-4
    assert dqn.DQNConfig.for_env("CartPole-v1") == dqn.DQNConfig()


def test_pong_smoke_run_with_prioritized_frame_replay_and_resume(tmp_path):
    """ALE/Pong-v5 through gymnasium's Atari preprocessing and frame stacking, the Nature conv net, the
    prioritized frame-stack buffer with 3-step returns: a short run, a checkpoint, a resumed run."""
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    out = str(tmp_path / "pong")
    argv = ["train", "dqn", "--env", "ALE/Pong-v5", "--steps", "240", "--buffer", "2000", "--learning-starts",
            "100", "--train-every", "40", "--gradient-steps", "2", "--batch", "8", "--eval-every", "1000000",
            "--solve-episodes", "0", "--checkpoint-every", "120", "--out", out, "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["gradient_steps"] == 8 and summary["config"]["n_step"] == 3 and summary["config"]["prioritized"]
    buffer = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["buffer"]
    assert buffer["storage"]["frame"].shape == (2000, 84, 84) and buffer["count"] > 200
    assert cli.main(argv[:5] + ["300"] + argv[6:] + ["--resume"]) == 0
    assert json.load(open(os.path.join(out, "summary.json")))["gradient_steps"] == 10


def test_registry_finds_dqn():
    assert "dqn" in registry.entries("train")
    with pytest.raises(ValueError, match="twice"):
        registry.register("train", "dqn", help="", run=lambda a: 0)(lambda p: None)
