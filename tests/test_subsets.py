"""Subsets and splits that cannot mislead: --limit-train/--limit-test drawn class by class from
--seed, a flat folder's split drawn from --seed and recorded (data.json), and eval / --resume
refusing data that is not what the run recorded."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli_ok, run_cli
from trainkit import TrainConfig
from trainkit.data.dataset import ImageData, balanced_indices
from trainkit.data.manifest import changes, check_same_data
from trainkit.errors import TrainkitError
from trainkit.run.experiment import get_data
from trainkit.run.training import train

FIXED = dict(precision="fp32", channels_last="off", device="cpu", progress=False)


def write_classes(root: Path, per_class: int, classes=("circle", "square", "triangle"), start: int = 0) -> Path:
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.new("L", (10, 10), 40 + 80 * c + i % 7).save(root / label / f"{i:03d}.png")
    return root


def test_limits_draw_every_class_from_the_seed(tmp_path, capsys):
    root = tmp_path / "pics"
    write_classes(root / "train", 10)
    write_classes(root / "test", 4)
    cfg = TrainConfig(dataset=f"imagefolder:{root}", limit_train=6, limit_test=3, **FIXED)
    data = get_data(cfg)
    assert torch.bincount(data.train_labels).tolist() == [2, 2, 2]    # not the first 6 files: all "circle"
    assert torch.bincount(data.test_labels).tolist() == [1, 1, 1]
    again, other = get_data(cfg), get_data(cfg.replace(seed=7))
    assert torch.equal(again.train_images, data.train_images)          # the same seed, the same subset
    assert not torch.equal(other.train_images, data.train_images)
    capsys.readouterr()
    few = get_data(cfg.replace(limit_test=2))                          # 2 images cannot hold 3 classes
    assert len(few.test_labels) == 2
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    absent = {"circle", "square", "triangle"} - {few.classes[i] for i in few.test_labels.tolist()}
    assert len(warning) == 1 and f"hold no image of 1 classes ({absent.pop()})" in warning[0]


def test_no_limit_keeps_the_data_and_its_order():
    labels = torch.tensor([3, 1, 2, 0] * 5)
    assert balanced_indices(labels, None, 1) is None and balanced_indices(labels, 20, 1) is None
    picked = balanced_indices(labels, 8, 1)
    assert torch.equal(picked, picked.sort().values) and torch.bincount(labels[picked]).tolist() == [2, 2, 2, 2]
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    data = ImageData("x", images, labels, images, labels, list("abcd"), (0.5,), (0.2,))
    whole = data.subset(None, None, seed=5)
    assert whole.train_images is data.train_images and whole.test_labels is data.test_labels


def test_a_flat_folder_is_split_from_the_seed_and_recorded(tmp_path):
    root = write_classes(tmp_path / "pics", 10)
    cfg = TrainConfig(dataset=f"imagefolder:{root}", **FIXED)
    a, b, c = get_data(cfg), get_data(cfg), get_data(cfg.replace(seed=2))
    assert a.files["test"] == b.files["test"] and a.files["test"] != c.files["test"]
    assert len(a.files["test"]) == 6 and not set(a.files["test"]) & set(a.files["train"])
    streamed = get_data(cfg.replace(pipeline="stream"))
    assert streamed.manifest() == a.manifest()                         # both paths record the same data
    manifest = a.manifest()
    assert manifest["splits"]["test"]["files"] == a.files["test"] and len(manifest["files"]) == 30
    assert changes(manifest, b.manifest(), ("train", "test")) is None
    assert changes(manifest, c.manifest(), ("test",)).startswith("its test split holds other images")


def test_eval_and_resume_refuse_changed_data(tmp_path):
    root = write_classes(tmp_path / "pics", 6)
    cfg = TrainConfig(dataset=f"imagefolder:{root}", model="compact", epochs=1, batch_size=8, **FIXED)
    train(cfg, out=tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert recorded["splits"]["test"]["fingerprint"] and len(recorded["files"]) == 18
    check_same_data(tmp_path / "run", get_data(cfg).manifest(), ("train", "test"), "eval")   # unchanged: fine
    write_classes(root, 2, start=100)                                  # 6 files added
    (root / "circle" / "000.png").write_bytes((root / "square" / "000.png").read_bytes())   # 1 modified
    with pytest.raises(TrainkitError) as refused:
        check_same_data(tmp_path / "run", get_data(cfg).manifest(), ("test",), "eval")
    message = str(refused.value)
    assert "files 6 added (circle/100.png, circle/101.png, square/100.png and 3 more), 0 removed, " \
           "1 modified (circle/000.png)" in message and "\n" not in message
    with pytest.raises(TrainkitError, match="6 added.*--resume refuses"):
        train(cfg.replace(epochs=2), resume=tmp_path / "run")


@pytest.mark.slow
def test_eval_of_a_changed_folder_is_one_line(tmp_path):
    root = write_classes(tmp_path / "pics", 6)
    run = tmp_path / "run"
    cli_ok("train", "--dataset", f"imagefolder:{root}", "--model", "compact", "--epochs", "1", "--batch-size", "8",
           "--no-progress", "--precision", "fp32", "--channels-last", "off", "--out", run)
    assert cli_ok("eval", run).stdout.strip().splitlines()[-1].startswith("Test set:")
    (root / "square" / "003.png").unlink()
    assert_one_line_error(run_cli("eval", run), "is not what", "1 removed (square/003.png)", "eval refuses")


def test_a_run_made_before_manifests_is_read_as_it_was_then(tmp_path):
    """No data.json: the flat split of seed 0 and the first --limit images, as trainkit read them before."""
    root = write_classes(tmp_path / "pics", 10)
    cfg = TrainConfig(dataset=f"imagefolder:{root}", limit_test=4, **FIXED)
    old = get_data(cfg, before_manifests=True)
    from trainkit.data.folders import split_folder
    split = split_folder(root, seed=0)
    assert old.files["test"] == [p.relative_to(root).as_posix() for p, _ in split.test][:4]
    assert old.files["test"] != get_data(cfg).files["test"]            # the new recipe: seed 1, class by class
