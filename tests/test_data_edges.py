"""Cases an outside user's probe of the data layer found read wrong without a word: a named pipe
among a CIFAR folder's batches, a run from before data.json, classes with no image in a split, a
refusal's reason cut in the middle."""
import json
import os
import threading

import pytest
import torch
from PIL import Image

from test_own_data import own_cifar10
from trainkit import TrainConfig, train
from trainkit.data import ImageData, load_dataset
from trainkit.data.dataset import warn_empty_classes
from trainkit.data.folders import report_skipped
from trainkit.errors import TrainkitError


def test_a_named_pipe_among_cifar_batches_is_one_line_not_a_hang(tmp_path):
    folder = own_cifar10(tmp_path / "mine", batches=(6, 5, 4))
    os.remove(folder / "data_batch_2")
    os.mkfifo(folder / "data_batch_2")        # open() of it would wait for a writer for ever
    outcome = []

    def load():
        try:
            load_dataset(f"cifar10:{folder}", tmp_path, progress=False)
        except TrainkitError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "reading a CIFAR folder blocked on a named pipe"
    assert outcome and "data_batch_2 is not a regular file" in outcome[0]


def test_classes_without_images_in_a_split_are_said(capsys):
    images = torch.zeros(6, 1, 28, 28, dtype=torch.uint8)
    data = ImageData("x", images, torch.tensor([0, 0, 1, 1, 0, 1]), images[:3], torch.tensor([0, 1, 2]),
                     ["a", "b", "c"], (0.5,), (0.5,))
    warn_empty_classes(data)
    err = capsys.readouterr().err
    assert "the training images hold no image of 1 of the 3 classes (c)" in err and "test images" not in err


def test_the_per_class_table_does_not_score_a_class_with_no_test_image(mnist, tmp_path):
    data = mnist.limit(256, 64)
    keep = data.test_labels != 9
    data = ImageData(data.name, data.train_images, data.train_labels, data.test_images[keep], data.test_labels[keep],
                     data.classes, data.mean, data.std)
    train(TrainConfig(epochs=1, batch_size=64, progress=False, precision="fp32", channels_last="off",
                      model="speednet"), data=data, out=tmp_path / "run")
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "9:      - (no test image of it)" in summary and " 0:" in summary


def test_a_refusals_reason_is_not_cut_in_its_middle(tmp_path, capsys):
    reason = "was refused: Image size (110000000 pixels) exceeds limit of 89,478,485 pixels (a decompression bomb?)"
    report_skipped(tmp_path, [(tmp_path / "a" / "big.png", reason)], 10, "skip")
    assert "89,478,485 pixels" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_run_from_before_data_json_says_its_data_is_unchecked(tmp_path):
    from conftest import cli_ok
    root = tmp_path / "pics"
    for label, colour in enumerate(("black", "white")):
        (root / colour).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (28, 28), 40 * i if label == 0 else 255 - 20 * i).save(root / colour / f"{i}.png")
    run = tmp_path / "run"
    cli_ok("train", "--dataset", f"imagefolder:{root}", "--model", "speednet", "--epochs", "1", "--batch-size", "4",
           "--out", run, "--no-progress", "--precision", "fp32", "--channels-last", "off")
    (run / "data.json").unlink()
    saved = json.loads((run / "config.json").read_text())
    del saved["config"]["resize"]                  # as a run from before --resize recorded it
    for later in ("data_json", "final", "mlflow_register"):     # nor data.json, nor these
        saved.pop(later, None), saved["config"].pop(later, None)
    (run / "config.json").write_text(json.dumps(saved))
    proc = cli_ok("eval", run)
    assert "predates data.json" in proc.stderr and "cannot be checked" in proc.stderr
