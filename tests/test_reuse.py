"""Reuse: the Python API, user models, other datasets, config files, reports, inference, export."""
import json
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT, assert_one_line_error, cli_ok, data_dir, metrics_without_time, run_cli, run_clis
from trainkit import ImageData, TrainConfig, train
from trainkit.config import from_mapping, load_config_file


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(data_dir()))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].history[-1].test_acc > 50.0
    assert (tmp_path / "runs" / "api-demo" / "metrics.csv").is_file()


@pytest.mark.slow
def test_own_dataset_object(mnist):
    train_set = torch.utils.data.TensorDataset(mnist.train_images[:512].float() / 255, mnist.train_labels[:512])
    test_set = torch.utils.data.TensorDataset(mnist.test_images[:200], mnist.test_labels[:200])
    data = ImageData.from_datasets(train_set, test_set, classes=[str(i) for i in range(10)])
    assert torch.equal(data.train_images, mnist.train_images[:512])
    assert abs(data.mean[0] - 0.13) < 0.02
    history = train(TrainConfig(epochs=1, batch_size=32, model="compact", progress=False), data=data, write=False).history
    assert history[0].train_seen == 512


MODEL_FILE = """
import torch.nn as nn
def tiny(in_channels=1, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 28 * 28, num_classes), nn.LogSoftmax(dim=1))
"""


@pytest.mark.slow
@pytest.mark.parametrize("form", ["file", "module"])
def test_train_a_model_of_your_own(tmp_path, form):
    if form == "file":
        (tmp_path / "mynet.py").write_text(MODEL_FILE)
        spec = "mynet.py:tiny"
    else:
        (tmp_path / "mypkg").mkdir()
        (tmp_path / "mypkg" / "__init__.py").write_text("")
        (tmp_path / "mypkg" / "nets.py").write_text(MODEL_FILE)
        spec = "mypkg.nets:tiny"
    proc = cli_ok("train", "--model", spec, "--epochs", "1", "--limit-train", "2048", "--limit-test", "500",
                   "--batch-size", "32", "--out", "run", "--no-progress", cwd=tmp_path)
    last = [l for l in proc.stdout.splitlines() if l.startswith("Test set")][-1]
    assert float(re.search(r"\((\d+\.\d+)%\)", last).group(1)) > 70.0   # a linear model learns this much


@pytest.mark.slow
def test_fashion_mnist(tmp_path, request):
    if not (data_dir() / "FashionMNIST" / "raw").is_dir():
        request.getfixturevalue("fashion_mnist_package")    # else read from Debian's package, or skipped
    cli_ok("train", "--dataset", "fashion-mnist", "--model", "compact", "--epochs", "2", "--limit-train",
                   "4096", "--limit-test", "500", "--batch-size", "32", "--lr", "0.05", "--out", tmp_path / "run",
                   "--no-progress")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["classes"][0] == "T-shirt/top"
    acc = float(open(tmp_path / "run" / "metrics.csv").read().splitlines()[-1].split(",")[6])
    assert acc > 65.0     # measured 73.6%; ten classes at chance would be 10%


@pytest.mark.slow
def test_image_folder(tmp_path, mnist):
    # three classes of colour PNGs of another size, made from MNIST digits 0, 1 and 7
    root = tmp_path / "digits"
    for label in (0, 1, 7):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        picks = (mnist.train_labels == label).nonzero().squeeze(1)[:150]
        for i in picks.tolist():
            gray = Image.fromarray(mnist.train_images[i, 0].numpy()).resize((40, 40))
            Image.merge("RGB", [gray, gray, gray]).save(folder / f"{i}.png")
    (root / "class_7" / "notes.txt").write_text("not an image")    # ignored
    out = tmp_path / "run"
    # The folder is RGB 40x40 (its own colour and size by default); S5Net needs 1x28x28, so say so.
    cli_ok("train", "--dataset", f"imagefolder:{root}", "--epochs", "3", "--batch-size", "16",
           "--channels", "1", "--image-size", "28", "--out", out, "--no-progress")
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["image_shape"] == [1, 28, 28]
    assert saved["data"]["classes"] == ["class_0", "class_1", "class_7"]
    assert saved["data"]["train_size"] == 360 and saved["data"]["test_size"] == 90
    assert 0.05 < saved["data"]["mean"][0] < 0.3                   # computed from the images
    acc = float(open(out / "metrics.csv").read().splitlines()[-1].split(",")[6])
    assert acc > 85.0     # measured 98.9%; three classes at chance would be 33%
    assert_one_line_error(run_cli("train", "--dataset", f"imagefolder:{tmp_path / 'none'}"), "does not exist")


@pytest.mark.slow
def test_config_files_and_flags(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 3\nbatch-size: 64\nlr: 0.02\nmodel: compact\n")
    (tmp_path / "b.toml").write_text('epochs = 4\nscheduler = "onecycle"\n')
    assert from_mapping(load_config_file(tmp_path / "a.yaml")) == TrainConfig(epochs=3, batch_size=64, lr=0.02,
                                                                                model="compact")
    assert from_mapping(load_config_file(tmp_path / "b.toml")).scheduler == "onecycle"
    from trainkit.commands.cli import build_parser, config_from_args
    cfg, _ = config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "a.yaml"), "--epochs", "9"]))
    assert (cfg.epochs, cfg.batch_size) == (9, 64)                # the flag wins over the file
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    (tmp_path / "bad2.yaml").write_text("epochs: three\n")
    unknown, not_int = run_clis(["train", "--config", tmp_path / "bad.yaml"], ["train", "--config", tmp_path / "bad2.yaml"])
    assert_one_line_error(unknown, "unknown setting 'epochz'")
    assert_one_line_error(not_int, "'three' is not a valid int")


@pytest.mark.slow
def test_config_json_reproduces_the_run(quick_run, tmp_path):
    out, _ = quick_run
    cli_ok("train", "--config", out / "config.json", "--out", tmp_path / "again", "--no-progress")
    assert metrics_without_time(out) == metrics_without_time(tmp_path / "again")


@pytest.mark.slow
def test_eval_reproduces_the_final_test_accuracy(quick_run):
    out, _ = quick_run
    proc = cli_ok("eval", out)
    last = open(out / "metrics.csv").read().splitlines()[-1].split(",")
    assert f"Accuracy: {last[7]}/{last[8]}" in proc.stdout


@pytest.mark.slow
def test_eval_of_a_bf16_channels_last_run_prints_the_test_line_training_printed(tmp_path):
    # On a CPU without bf16 (an AVX2-only one) --precision bf16 is refused in one line, and the
    # check below runs in fp32, still channels_last: every CPU runs this test.
    from trainkit.loop.devices import bf16_supported
    out = tmp_path / "run"
    flags = ["train", "--model", "speednet", "--limit-train", "256", "--limit-test", "500", "--epochs", "1",
             "--batch-size", "64", "--channels-last", "on", "--no-progress"]
    precision = "bf16"
    if not bf16_supported(torch.device("cpu")):
        refused = run_cli(*flags, "--precision", "bf16", "--out", tmp_path / "refused")
        assert_one_line_error(refused, "--precision bf16 is not supported on cpu")
        precision = "fp32"
    trained = cli_ok(*flags, "--precision", precision, "--out", out)
    line = [l for l in trained.stdout.splitlines() if l.startswith("Test set:")][-1]
    assert cli_ok("eval", out).stdout.strip() == line.strip()
    # to the last bit of the loss that metrics.csv holds (in fp32 or contiguous, it differs from 1e-5 on)
    from trainkit.run.experiment import evaluation_loader, get_data
    from trainkit.commands.inference import evaluate_trained, load_run
    run = load_run(out)
    data = get_data(run.cfg.replace(limit_train=1), channels=1, size=(28, 28))
    loss, correct, total = evaluate_trained(run, evaluation_loader(data, run.cfg.test_batch_size, run.mean, run.std))
    recorded = open(out / "metrics.csv").read().splitlines()[-1].split(",")
    assert loss == pytest.approx(float(recorded[5]), rel=1e-7, abs=0) and correct == int(recorded[7])


@pytest.mark.slow
def test_predict_a_hand_drawn_digit(quick_run, tmp_path):
    out, _ = quick_run
    image = Image.new("RGB", (120, 160), "black")                 # any size, colour
    ImageDraw.Draw(image).line([(60, 25), (60, 135)], fill="white", width=14)   # a "1"
    image.save(tmp_path / "one.png")
    image.convert("L").save(tmp_path / "one.jpg")
    # a dark "1" on white paper, small in a corner: inverted (and said so), framed like MNIST
    paper = Image.new("L", (300, 200), 235)
    ImageDraw.Draw(paper).line([(250, 20), (246, 90)], fill=30, width=8)
    paper.save(tmp_path / "paper.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    ones, inverted, bad, missing = run_clis(["predict", out, tmp_path / "one.png", tmp_path / "one.jpg", "--top", "3"],
                                            ["predict", out, tmp_path / "paper.png"],
                                            ["predict", out, tmp_path / "bad.png"],
                                            ["predict", out, tmp_path / "missing.png"])
    assert ones.returncode == 0 and inverted.returncode == 0, (ones.stderr[-2000:], inverted.stderr[-2000:])
    lines = ones.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        top = re.search(r": (\S+) (\d+\.\d)%", line)
        assert top.group(1) == "1", line
        assert line.count("%") == 3
    assert re.search(r": 1 \d+\.\d%", inverted.stdout), inverted.stdout
    assert "note: inverted: a dark digit on a light background" in inverted.stderr
    assert_one_line_error(bad, "not a readable image")
    assert_one_line_error(missing, "missing.png does not exist")


@pytest.mark.slow
def test_onnx_export_agrees_with_pytorch(quick_run, tmp_path, mnist):
    import onnxruntime
    from trainkit.commands.inference import load_run
    out, _ = quick_run
    cli_ok("export", out, "--format", "onnx", "--output", tmp_path / "m.onnx")
    trained = load_run(out)
    x = trained.preprocess(mnist.test_images[:64])
    expected = trained.model(x).detach().numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_torchscript_export(quick_run, tmp_path, mnist):
    from trainkit.commands.inference import load_run
    out, _ = quick_run
    cli_ok("export", out, "--format", "torchscript")
    scripted = torch.jit.load(str(out / "model.ts"))
    trained = load_run(out)
    x = trained.preprocess(mnist.test_images[:16])
    torch.testing.assert_close(scripted(x), trained.model(x), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("progress", ["--progress", "--no-progress"])
def test_tensorboard_events(tmp_path, progress):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    out = tmp_path / "run"
    proc = cli_ok("train", "--epochs", "2", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
                  "--evals-per-epoch", "2", "--scheduler", "onecycle", "--tensorboard", "--out", out, progress)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/train_loss", "step/lr", "check/test_loss", "check/test_acc", "train_loss", "test_acc"} <= tags
    accs = [e.value for e in events.Scalars("test_acc")]
    csv_accs = [float(r.split(",")[6]) for r in open(out / "metrics.csv").read().splitlines()[1:]]
    assert accs == pytest.approx(csv_accs)
    # one x-axis, the batches trained: an epoch's numbers at the step it ended (4 batches an epoch)
    assert [e.step for e in events.Scalars("train_loss")] == [4, 8]
    assert [e.step for e in events.Scalars("test_acc")] == [4, 8]
    # every check at the batches trained (4 an epoch: after 2 and 4), the epoch's own among them
    checks = events.Scalars("check/test_acc")
    assert [e.step for e in checks] == [2, 4, 6, 8] and checks[-1].value == pytest.approx(csv_accs[-1])
    losses = events.Scalars("step/train_loss")
    assert losses and all(1 <= e.step <= 8 and 0 < e.value < 10 for e in losses)
    assert losses[-1].step == 8, "the epoch's last batch is read at its end"
    # the rate each step trained with (onecycle changes it every step): a step's first is the epoch's
    rates = events.Scalars("step/lr")
    assert [e.step for e in rates] == list(range(1, 9))
    said = [float(x) for x in re.findall(r"Adjusting learning rate of group 0 to (\S+)\.\n", proc.stdout)]
    assert [rates[0].value, rates[4].value] == pytest.approx(said, rel=1e-3)
    assert "lr" not in tags          # the epoch's starting rate, drawn at its end, was a second, wrong curve
    # the HParams tab: the settings the run ran with, and the final numbers as its metrics
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["batch_size"].number_value == 64 and session.hparams["model"].string_value == "s5net"
    assert session.hparams["precision"].string_value in ("fp32", "bf16")     # what auto chose
    assert "_hparams_/experiment" not in content    # TensorBoard makes it from every run's session


@pytest.mark.slow
def test_tensorboard_with_a_validation_split_has_the_final_test(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    cli_ok("train", "--epochs", "1", "--limit-train", "384", "--val-split", "128", "--limit-test", "128",
           "--batch-size", "64", "--evals-per-epoch", "2", "--tensorboard", "--out", out, "--no-progress")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("check/val_acc")] == [2, 4]
    assert [e.step for e in events.Scalars("check/test_loss")] == [4]      # the test set, once, at the end
    last = open(out / "metrics.csv").read().splitlines()[-1].split(",")
    assert [(e.step, e.value) for e in events.Scalars("test_acc")] == [(4, pytest.approx(float(last[6])))]


@pytest.mark.slow
def test_lr_find(tmp_path):
    proc = cli_ok("lr-find", "--steps", "40", "--limit-train", "1024", "--batch-size", "32",
                   "--output", tmp_path / "lr.png")
    suggested = float(re.search(r"Suggested lr: (\S+)", proc.stdout).group(1))
    assert 1e-5 <= suggested <= 1.0
    with Image.open(tmp_path / "lr.png") as img:
        assert img.size[0] > 300


@pytest.mark.slow
def test_patience_flag(tmp_path):
    cli_ok("train", "--epochs", "5", "--limit-train", "256", "--limit-test", "128", "--lr", "1e-9",
                   "--patience", "1", "--out", tmp_path / "run", "--no-progress")
    assert len(open(tmp_path / "run" / "metrics.csv").read().splitlines()) == 1 + 2


def test_tensorboard_hparams_keep_a_settings_type_when_one_run_leaves_it_unset(tmp_path):
    """Two runs' HParams sessions, one with --limit-train 256 and one without, read by TensorBoard
    itself (its server, in this process): limit_train stays a number column and differs. "None" (a
    string) made it a string column, and each run's own experiment summary hid that it differs."""
    import urllib.request

    from tensorboard import program
    from trainkit.loop.callbacks import TensorBoardLogger
    from trainkit.loop.engine import EpochResult, History, TrainState

    for name, limit in (("with", 256), ("without", None)):
        logger = TensorBoardLogger(tmp_path / name, settings=TrainConfig(limit_train=limit, epochs=3).to_dict())
        state = TrainState(model=None, optimizer=None, scheduler=None, train_loader=None, test_loader=None,
                           device=torch.device("cpu"), history=History([EpochResult(1, 0.1, 1.0, 50.0, 256, 1.0, 60.0,
                                                                                    6, 10, 1.0)]))
        logger.on_fit_start(state)
        logger.on_fit_end(state)
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(tmp_path), "--host", "127.0.0.1", "--port", "0"])
    url = board.launch()
    request = urllib.request.Request(url + "data/plugin/hparams/experiment", data=b'{"experimentName": ""}',
                                     headers={"Content-Type": "application/json"})
    for _ in range(50):      # the server reads the event files shortly after it starts
        infos = {h["name"]: h for h in json.load(urllib.request.urlopen(request, timeout=10)).get("hparamInfos", [])}
        if "limit_train" in infos:
            break
        time.sleep(0.2)
    assert infos["limit_train"]["type"] == "DATA_TYPE_FLOAT64" and infos["limit_train"]["differs"] is True
    assert infos["epochs"]["type"] == "DATA_TYPE_FLOAT64" and not infos["epochs"].get("differs")
    assert infos["model"]["type"] == "DATA_TYPE_STRING" and not infos["model"].get("differs")
