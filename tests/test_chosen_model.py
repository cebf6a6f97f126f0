"""The model that was chosen is the model reported (issue #23, items 3 and 4): with a validation
split the final test, model.pt and what is made from them use the best validation epoch's weights
(`--final last` keeps the last ones); a resumed or extended run's config.json says what ran."""
import json

import pytest
import torch

from trainkit import Callback, TrainConfig, train
from trainkit.checkpoint import load_checkpoint, load_weights
from trainkit.commands.cli import main
from trainkit.commands.inference import load_run
from trainkit.config import from_mapping, load_config_file
from trainkit.data.loaders import TensorLoader
from trainkit.loop.engine import evaluate


class SpoilTheLastEpoch(Callback):
    """Zeroes every weight after the last batch of epoch `epoch`: that epoch validates at chance,
    so an earlier one is the best, whatever the data and the CPU."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_batch_end(self, state):
        if state.epoch == self.epoch and state.batch + 1 == state.num_batches:
            with torch.no_grad():
                for p in state.module.parameters():
                    p.zero_()


CFG = TrainConfig(model="speednet", epochs=2, batch_size=32, lr=0.05, val_split=0.25, progress=False, precision="fp32",
                  channels_last="off")


def test_the_best_validation_epoch_is_the_model_reported(mnist, tmp_path, capsys):
    from trainkit.run.reports import ConsoleLogger
    data = mnist.limit(1024, 500)
    result = train(CFG, data=data, out=tmp_path / "best", callbacks=[SpoilTheLastEpoch(2), ConsoleLogger(False)])
    history = result.history
    assert history[0].val_acc > 50 and history[1].val_acc < 30       # epoch 1 is the best (measured: 9x% and 1x%)
    out = capsys.readouterr().out
    assert "with the weights of epoch 1, the best on validation" in out
    # model.pt holds best.pt's weights, and the final test number is theirs.
    best = load_checkpoint(tmp_path / "best" / "best.pt")
    assert best["epoch"] == 1
    weights = load_weights(tmp_path / "best" / "model.pt")
    assert all(torch.equal(weights[k], best["model"][k]) for k in weights)
    trained = load_run(tmp_path / "best")
    loader = TensorLoader(data.test_images, data.test_labels, 1000, mean=trained.mean, std=trained.std)
    _, correct, total = evaluate(trained.model, loader, device=torch.device("cpu"))
    assert (correct, total) == (history[-1].test_correct, history[-1].test_total) and correct > 0.5 * total

    # --final last: the spoiled last epoch is what is reported, as asked. Zeroed weights score chance on
    # any data, so a smaller subset shows it.
    last = train(CFG.replace(final="last"), data=mnist.limit(256, 100), out=tmp_path / "last",
                 callbacks=[SpoilTheLastEpoch(2)])
    assert last.history[-1].test_acc < 30
    assert not load_weights(tmp_path / "last" / "model.pt")["head.weight"].any()     # the zeroed weights


def test_without_a_validation_split_the_last_weights_stay(mnist, tmp_path):
    cfg = CFG.replace(val_split=None)
    result = train(cfg, data=mnist.limit(256, 100), out=tmp_path / "run", callbacks=[SpoilTheLastEpoch(2)])
    assert result.history[-1].test_acc < 30          # the seed's behaviour: the last epoch is the model
    assert "BestWeights" not in load_checkpoint(tmp_path / "run" / "last.pt")["callbacks"]


@pytest.mark.slow
def test_an_extended_run_says_so_in_its_config(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--limit-train", "256", "--limit-test", "128", "--batch-size", "64", "--no-progress",
            "--precision", "fp32", "--channels-last", "off"]
    assert main(["train", *args, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["epochs"] == 2 and "environment" in saved and "model" in saved
    assert from_mapping(load_config_file(run / "config.json")).epochs == 2
    assert load_checkpoint(run / "last.pt")["config"] == saved["config"]
