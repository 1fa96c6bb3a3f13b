"""AlexNet on dlcore (models/alexnet.py): same weights → same outputs and gradients as the stock twin (both layouts,
train and eval), torchvision's state_dict keys, `dlcore train alexnet` reaching issue 3's 95% on the digits,
`dlcore profile alexnet`."""
import json

import pytest
import torch

from dlcore.cli import main as cli
from dlcore.models.alexnet import AlexNet, alexnet
from dlcore.nn import Conv2dReLU, Conv2dReLUMaxPool2d, LinearReLUDropout


@pytest.mark.parametrize("layout", ["torchvision", "paper"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_twins_match_outputs_and_gradients(layout, channels_last):
    torch.manual_seed(0)  # dropout 0: the twins' dropout masks come from different generators (Philox vs torch's)
    ours = AlexNet(num_classes=10, layout=layout, dropout=0.0).double()
    stock = AlexNet(num_classes=10, layout=layout, dropout=0.0, stock=True).double()
    stock.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 100, 100, dtype=torch.float64).contiguous(memory_format=fmt)
    for training in (True, False):
        ours.train(training), stock.train(training)
        a, b = ours(x), stock(x)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for g, h in zip(torch.autograd.grad(a.square().sum(), list(ours.parameters())),
                        torch.autograd.grad(b.square().sum(), list(stock.parameters()))):
            torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)


def test_torchvision_layout_and_keys():
    model = alexnet()
    keys = list(model.state_dict().keys())
    assert keys == ["features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                    "features.6.weight", "features.6.bias", "features.8.weight", "features.8.bias",
                    "features.10.weight", "features.10.bias", "classifier.1.weight", "classifier.1.bias",
                    "classifier.4.weight", "classifier.4.bias", "classifier.6.weight", "classifier.6.bias"]
    assert sum(p.numel() for p in model.parameters()) == 61_100_840  # torchvision's alexnet
    assert isinstance(model.features[0], Conv2dReLUMaxPool2d) and isinstance(model.features[6], Conv2dReLU)
    assert isinstance(model.classifier[1], LinearReLUDropout) and model.classifier[1].p == 0.5
    model.eval()
    stock = alexnet(stock=True).eval()
    stock.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), stock(x), rtol=1e-4, atol=1e-5)  # eval: dropout is the identity
    assert model.features[3].weight.shape == (192, 64, 5, 5)
    assert alexnet(layout="paper").features[0].weight.shape == (96, 3, 11, 11)
    with pytest.raises(ValueError, match="layout must be"):
        alexnet(layout="vgg")


def test_train_alexnet_reaches_95_percent_on_digits(tmp_path):
    """Issue 3's target as `dlcore train alexnet` runs it (about 2 minutes on a 2-core CPU)."""
    assert cli(["train", "alexnet", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.load(open(tmp_path / "summary.json"))["test_accuracy"] >= 0.95


def test_profile_alexnet_reports_training_and_inference(capsys):
    assert cli(["profile", "alexnet", "--batch", "2", "--image-size", "64", "--steps", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "dlcore inference" in out and "torch eager" in out and "Self CPU" in out
