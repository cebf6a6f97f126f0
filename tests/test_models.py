import pytest
import torch
import torch.nn.functional as F

from trainkit.errors import TrainkitError
from trainkit.models import MODELS, S5Net, build_model, count_parameters


def test_s5net_has_the_seeds_parameter_count_and_shapes():
    model = S5Net()
    assert count_parameters(model) == 593_200
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["conv1.weight"] == (32, 1, 3, 3)
    assert shapes["conv4.weight"] == (256, 128, 3, 3)
    assert shapes["fc1.weight"] == (50, 4096)
    assert shapes["fc2.weight"] == (10, 50)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    # log-softmax output: probabilities sum to one
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_trains(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def loss():
        torch.manual_seed(1)  # the same dropout masks before and after the step
        out = model(x)
        assert out.shape == (32, 10)
        assert torch.isfinite(out).all()
        return F.nll_loss(out, y)

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert loss().item() < before.item()


def test_compact_model_is_small():
    assert count_parameters(build_model("compact")) < 20_000


def test_unknown_model_is_a_clear_error():
    with pytest.raises(TrainkitError, match="unknown model 'resnet9000'"):
        build_model("resnet9000")


def test_user_model_from_a_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text("import torch.nn as nn\n"
                    "def tiny(in_channels=1, num_classes=10):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 784, num_classes), nn.LogSoftmax(1))\n")
    model = build_model(f"{path}:tiny")
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(TrainkitError, match="no callable named 'nope'"):
        build_model(f"{path}:nope")
