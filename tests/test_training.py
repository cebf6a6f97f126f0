"""Real training on small MNIST subsets: accuracy, the seed's console lines, the run directory."""
import csv
import json
import re

import pytest
import torch
from PIL import Image

from trainkit import TrainConfig, train
from trainkit.loop.engine import Callback
from trainkit.models import S5Net

from conftest import QUICK_MIN_ACC, cli_ok


@pytest.mark.slow
def test_quick_run_learns(quick_run):
    out, _ = quick_run
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]          # one row per epoch
    assert float(rows[-1]["test_acc"]) >= QUICK_MIN_ACC
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert int(rows[-1]["train_seen"]) == 2048


@pytest.mark.slow
def test_console_shows_the_seeds_lines(quick_run):
    _, proc = quick_run
    out = proc.stdout
    assert out.count("Adjusting learning rate of group 0 to 1.0000e-02.") == 2
    assert "Epoch 1" in out and "Epoch 2" in out
    assert re.search(r"Test set: Average loss: \d\.\d{4}, Accuracy: \d+/1000 \(\d+\.\d{2}%\)", out)
    bar = proc.stderr  # tqdm writes to stderr
    assert re.search(r"Train: Loss=\d\.\d{4} Batch_id=63 Accuracy=\d+\.\d{2}: 100%\|.*\| 64/64", bar)
    assert "Run saved in" in out


@pytest.mark.slow
def test_run_directory(quick_run):
    out, _ = quick_run
    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["epochs"] == 2 and saved["config"]["batch_size"] == 32
    assert saved["environment"]["torch"] == torch.__version__
    assert {"python", "torchvision", "device"} <= saved["environment"].keys()
    sizes = {"plot.png": (1200, 800), "samples.png": (704, 576)}
    for name, size in sizes.items():
        with Image.open(out / name) as img:
            assert img.size == size, (name, img.size)
    for name in ("confusion.png", "mistakes.png"):
        with Image.open(out / name) as img:
            img.verify()
    model = S5Net()
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    summary = (out / "summary.txt").read_text()
    assert "Total params: 593,200" in summary and "Per-class test accuracy" in summary


@pytest.mark.slow
def test_same_seed_same_numbers(mnist):
    cfg = TrainConfig(epochs=1, limit_train=512, limit_test=256, batch_size=64, progress=False)
    data = mnist.limit(512, 256)
    first = train(cfg, data=data, write=False).history
    second = train(cfg, data=data, write=False).history
    other = train(cfg.replace(seed=2), data=data, write=False).history
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h.rows()]
    assert strip(first) == strip(second)
    assert strip(first) != strip(other)


@pytest.mark.slow
def test_target_accuracy_and_patience_stop_early(mnist):
    data = mnist.limit(1024, 256)
    cfg = TrainConfig(epochs=5, batch_size=32, progress=False)
    assert len(train(cfg.replace(target_acc=50.0), data=data, write=False).history) < 5
    history = train(cfg.replace(epochs=6, lr=1e-9, patience=2), data=data, write=False).history
    assert len(history) == 3         # nothing improves after epoch 1 with a learning rate of 1e-9


@pytest.mark.slow
def test_seed_pipeline_runs_with_workers(mnist):
    cfg = TrainConfig(epochs=1, batch_size=64, pipeline="torchvision", workers=2, progress=False)
    history = train(cfg, data=mnist.limit(512, 256), write=False).history
    assert history[0].train_seen == 512 and history[0].test_total == 256
    assert history[0].test_acc > 10.0


def test_check_points_split_the_epoch_evenly():
    from trainkit.loop.engine import check_points
    assert check_points(118, 1) == frozenset()
    assert check_points(118, 4) == {28, 58, 87}           # the 4th evaluation is the epoch's own
    assert check_points(8, 2) == {3}
    assert check_points(3, 10) == {0, 1}                  # never more evaluations than batches


class _Checks(Callback):
    """Records every mid-epoch check as (epoch, batch index, accuracy)."""

    def __init__(self):
        self.checks = []

    def on_evaluate(self, state):
        e = state.evaluation
        if e.after_batch is not None:
            self.checks.append((e.epoch, e.after_batch - 1, e.acc))


@pytest.mark.slow
def test_mid_epoch_evaluations_stop_at_the_target(mnist, tmp_path):
    data = mnist.limit(2048, 500)
    cfg = TrainConfig(epochs=2, batch_size=32, progress=False, evals_per_epoch=4)
    # No target: every epoch is evaluated after batches 16, 32 and 48 of 64, and completes.
    seen = _Checks()
    history = train(cfg, data=data, write=False, callbacks=[seen]).history
    assert [(e, b) for e, b, _ in seen.checks] == [(1, 15), (1, 31), (1, 47), (2, 15), (2, 31), (2, 47)]
    assert [r.train_seen for r in history] == [2048, 2048]
    # A target between the first check's accuracy and the end's: the run stops at a check,
    # part way through an epoch, and that check's numbers are the epoch's test result.
    first, final = seen.checks[0][2], history[-1].test_acc
    assert first < final - 5
    target = (first + final) / 2
    seen = _Checks()
    stopped = train(cfg.replace(target_acc=target), data=data, out=tmp_path / "run", callbacks=[seen]).history
    epoch, batch_id, acc = next(c for c in seen.checks if c[2] >= target)
    assert acc >= target and seen.checks[-1] == (epoch, batch_id, acc)
    assert len(stopped) == epoch and stopped[-1].test_acc == acc
    assert stopped[-1].train_seen == (batch_id + 1) * 32
    # Resuming that run finds it finished: nothing more is trained or evaluated.
    again = _Checks()
    resumed = train(cfg.replace(target_acc=target), data=data, resume=tmp_path / "run", callbacks=[again]).history
    assert again.checks == [] and resumed.rows() == stopped.rows()


@pytest.mark.slow
def test_mid_epoch_evaluations_are_printed(tmp_path):
    out = cli_ok("train", "--limit-train", "512", "--limit-test", "200", "--epochs", "1", "--batch-size", "64",
                 "--evals-per-epoch", "2", "--no-progress", "--out", tmp_path / "run").stdout
    assert re.search(r"^Test set after batch 4/8: Average loss: \d\.\d{4}, Accuracy: \d+/200 \(\d+\.\d{2}%\)$",
                     out, re.M), out
    assert out.count("Test set") == 2
