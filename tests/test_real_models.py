"""Real models and data: logits and log-probabilities, zoo models, runs that describe themselves,
factories that fail, the validation split, extending a run."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import assert_one_line_error, cli_ok, run_cli, run_clis
from trainkit import TrainConfig, build_experiment, train
from trainkit.commands.inference import load_run
from trainkit.models import build_model, output_kind


def small_cnn(log_softmax: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)]
    return nn.Sequential(*layers, *([nn.LogSoftmax(dim=1)] if log_softmax else []))


@pytest.mark.slow
def test_logits_train_like_log_probabilities(mnist, tmp_path):
    data = mnist.limit(1024, 300)
    # fixed settings: the two runs must not differ in what auto measures and chooses on this machine
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False, precision="fp32", channels_last="off",
                      compile="off")
    logits = train(cfg, model=small_cnn(False), data=data, out=tmp_path / "logits").history
    logprobs = train(cfg, model=small_cnn(True), data=data, write=False).history
    for a, b in zip(logits, logprobs):
        assert a.test_loss > 0 and a.train_loss > 0
        assert abs(a.test_acc - b.test_acc) <= 2.0 and abs(a.test_loss - b.test_loss) < 0.05
    assert logits[-1].test_acc > 80.0
    saved = json.loads((tmp_path / "logits" / "config.json").read_text())
    assert saved["model"]["outputs"] == "logits" and saved["model"]["kind"] == "python"
    trained = load_run(tmp_path / "logits", model=small_cnn(False))
    probs = trained.probabilities(mnist.test_images[:8])
    torch.testing.assert_close(probs.sum(1), torch.ones(8))


def test_the_seed_network_keeps_its_exact_loss(mnist):
    """S5Net returns log-probabilities: trained with nll_loss, bit for bit as before (cross_entropy
    would apply log_softmax once more and move the numbers in the last bits)."""
    exp = build_experiment(TrainConfig(progress=False), data=mnist.limit(64, 64))
    assert exp.outputs == "log_probs"
    out = torch.log_softmax(torch.randn(16, 10), 1)
    y = torch.randint(0, 10, (16,))
    assert torch.equal(exp.loss_fn(out, y), F.nll_loss(out, y))
    assert output_kind(small_cnn(False), (1, 28, 28), 10, "cnn") == "logits"


def test_torchvision_and_timm_models_build_for_the_data():
    tv = build_model("torchvision:resnet18", in_channels=1, num_classes=7)
    assert tv.conv1.in_channels == 1 and tv.fc.out_features == 7
    assert output_kind(tv, (1, 32, 32), 7, "tv") == "logits"
    pytest.importorskip("timm")
    tm = build_model("timm:resnet18", in_channels=3, num_classes=5)
    assert tuple(tm(torch.zeros(2, 3, 32, 32)).shape) == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--model", "torchvision:no_such_net"], "torchvision has no model 'no_such_net'"),
    (["--model", "torchvision:mobilenet_v3_small", "--pretrained"], "--pretrained needs its weights from"),
    (["--model", "s5net", "--pretrained"], "--pretrained needs a model from torchvision:NAME or timm:NAME"),
    (["--model", "torchvision:vit_b_16"], "needs 224x224 images, these are 28x28"),   # image_size is an int there
])
def test_zoo_errors_are_one_line(args, fragment, tmp_path):
    proc = run_cli("train", "--limit-train", "64", "--limit-test", "64", "--epochs", "1", "--out", tmp_path / "r", *args)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r").exists()           # no half-made run folder


BAD_FACTORIES = """
import torch.nn as nn
def raises(in_channels=1, num_classes=10):
    raise RuntimeError("boom")
def not_a_module():
    return 42
def wrong_shape(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 3))
def no_arguments():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
"""


@pytest.mark.slow
@pytest.mark.parametrize("factory, fragment", [
    ("raises", "the factory failed: RuntimeError: boom"),
    ("not_a_module", "returned int, not an nn.Module"),
    ("wrong_shape", "gives outputs of shape [2, 3]"),
])
def test_a_factory_that_fails_is_caught_before_the_run_folder(factory, fragment, tmp_path):
    (tmp_path / "nets.py").write_text(BAD_FACTORIES)
    proc = run_cli("train", "--model", f"nets.py:{factory}", "--limit-train", "64", "--limit-test", "64",
                   "--epochs", "1", "--out", "run", cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "run").exists()


def test_s5net_says_it_needs_28x28(tmp_path):
    for i, colour in enumerate(("black", "white") * 4):
        (tmp_path / "pics" / colour).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(tmp_path / "pics" / colour / f"{i}.png")
    from trainkit.data import ImageData
    data = ImageData("pics", torch.zeros(8, 1, 32, 32, dtype=torch.uint8), torch.arange(8) % 2,
                     torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.arange(2), ["a", "b"], (0.5,), (0.5,))
    with pytest.raises(Exception, match=r"needs 28x28 images, these are 32x32"):
        train(TrainConfig(progress=False, epochs=1), data=data, write=False)


@pytest.mark.slow
def test_a_file_model_run_is_inert_and_describes_itself(tmp_path, mnist_dir):
    marker = tmp_path / "imported.txt"
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mynet.py").write_text(
        "import pathlib, torch.nn as nn\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "def tiny(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n")
    cli_ok("train", "--model", "mynet.py:tiny", "--epochs", "1", "--limit-train", "512", "--limit-test", "200",
           "--batch-size", "64", "--out", tmp_path / "run", "--no-progress", cwd=tmp_path / "work")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["kind"] == "file" and len(saved["model"]["sha256"]) == 64
    assert saved["model"]["outputs"] == "logits" and saved["config"]["data_dir"].startswith("/")
    marker.unlink()
    # Opening the run folder from elsewhere does not import the file it names ...
    proc = run_cli("eval", tmp_path / "run", cwd=tmp_path)
    assert_one_line_error(proc, "names code", "--trust-code")
    assert not marker.exists()
    # ... unless asked, and then it evaluates the run's own dataset to its recorded accuracy.
    proc = cli_ok("eval", tmp_path / "run", "--trust-code", cwd=tmp_path)
    last = open(tmp_path / "run" / "metrics.csv").read().splitlines()[-1].split(",")
    assert f"Accuracy: {last[7]}/{last[8]}" in proc.stdout and marker.exists()
    # A changed file is not imported even with --trust-code.
    (tmp_path / "work" / "mynet.py").write_text("raise SystemExit('should not run')\n")
    Image.new("L", (28, 28)).save(tmp_path / "x.png")
    assert_one_line_error(run_cli("predict", tmp_path / "run", tmp_path / "x.png", "--trust-code"), "sha256 differs")


@pytest.mark.slow
def test_a_python_model_run_is_refused_by_the_cli(mnist, tmp_path):
    train(TrainConfig(epochs=1, batch_size=64, progress=False), model=small_cnn(True), data=mnist.limit(128, 64),
          out=tmp_path / "run")
    assert_one_line_error(run_cli("eval", tmp_path / "run"), "built in Python")


@pytest.mark.slow
def test_a_python_dataset_is_never_replaced_by_another(mnist, tmp_path):
    data = mnist.limit(256, 64)
    data.name = "my-digits"
    train(TrainConfig(epochs=1, batch_size=64, progress=False), data=data, out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["dataset"] == "python:my-digits"
    assert_one_line_error(run_cli("eval", tmp_path / "run"), "data given from Python", "will not evaluate another")


@pytest.mark.slow
def test_validation_split_chooses_and_the_test_set_is_used_once(mnist, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=64, val_split=0.25, evals_per_epoch=2, patience=3, progress=False)
    seen = []

    from trainkit import Callback

    class Splits(Callback):
        def on_evaluate(self, state):
            seen.append(state.evaluation.split)

    history = train(cfg, data=mnist.limit(1024, 300), out=tmp_path / "run", callbacks=[Splits()]).history
    assert seen == ["val"] * 4 + ["test"]                        # every check on validation, the test set once
    assert [r.val_total for r in history] == [256, 256] and history[0].test_acc is None
    assert history[-1].test_total == 300 and history[-1].train_seen == 768
    rows = open(tmp_path / "run" / "metrics.csv").read().splitlines()
    assert rows[0].endswith("val_loss,val_acc,val_correct,val_total") and rows[-1].split(",")[8] == "300"
    assert "validation accuracy" in (tmp_path / "run" / "summary.txt").read_text()


@pytest.mark.slow
def test_resume_extends_a_finished_run(finished_run, mnist_dir, tmp_path):
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))          # 1 epoch
    proc = cli_ok("train", "--resume", out, "--epochs", "2", "--no-progress")
    assert "Epoch 2" in proc.stdout and "Epoch 1\n" not in proc.stdout
    assert len(open(out / "metrics.csv").read().splitlines()) == 3
    cycle = TrainConfig(limit_train=256, limit_test=64, batch_size=64, epochs=1, scheduler="onecycle", progress=False,
                        data_dir=str(mnist_dir))
    train(cycle, out=tmp_path / "cycle")
    refused = run_clis(["train", "--resume", tmp_path / "cycle", "--epochs", "2"],
                       ["train", "--resume", out, "--recipe", "fast"],
                       ["train", "--resume", out, "--out", tmp_path / "x"])
    assert_one_line_error(refused[0], "onecycle")
    assert_one_line_error(refused[1], "--recipe cannot be combined")
    assert_one_line_error(refused[2], "--out")


@pytest.mark.slow
def test_init_from_a_run_starts_from_its_weights(mnist, tmp_path):
    data = mnist.limit(256, 64)
    cfg = TrainConfig(epochs=1, batch_size=64, progress=False)
    train(cfg, data=data, out=tmp_path / "first")
    saved = torch.load(tmp_path / "first" / "model.pt", weights_only=True)
    for source in (tmp_path / "first", tmp_path / "first" / "last.pt", tmp_path / "first" / "model.pt"):
        exp = build_experiment(cfg.replace(init_from=str(source)), data=data)
        for k, v in exp.model.state_dict().items():
            assert torch.equal(v.contiguous(), saved[k]), (source, k)
    with pytest.raises(Exception, match=r"does not fit the model CompactNet"):
        build_experiment(cfg.replace(model="compact", init_from=str(tmp_path / "first")), data=data)
