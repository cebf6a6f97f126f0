"""Image folders read as the user meant (trainkit/data/folders.py): hidden folders, non-regular
files, nested folders, every format, bad files reported once, the size said, the aspect ratio kept."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, run_cli
from trainkit import TrainConfig
from trainkit.data.folders import load_image_folder, split_folder
from trainkit.errors import TrainkitError
from trainkit.run.experiment import get_data


def square(path: Path, value: int, size=(12, 12), mode="L", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size[::-1], value if mode == "L" else (value,) * 3).save(path, format=fmt)


def two_classes(root: Path, per_class: int = 4) -> Path:
    for label, value in (("dark", 30), ("light", 220)):
        for i in range(per_class):
            square(root / label / f"{i}.png", value + i)
    return root


def test_hidden_folders_and_files_are_never_classes_or_images(tmp_path, capsys):
    root = two_classes(tmp_path / "pics")
    square(root / ".git" / "objects" / "x.png", 128)                  # a hidden folder: not a class
    square(root / "dark" / ".ipynb_checkpoints" / "0-checkpoint.png", 99)
    (root / "light" / ".DS_Store").write_bytes(b"\0\1junk")
    split = split_folder(root)
    assert split.classes == ["dark", "light"] and split.skipped == []
    assert len(split.train) + len(split.test) == 8
    assert all(not part.startswith(".") for p, _ in split.train + split.test for part in p.parts[-3:])


def test_nested_folders_and_every_format_are_read(tmp_path, capsys):
    root = two_classes(tmp_path / "pics", per_class=2)
    formats = {".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".gif": "GIF", ".jpeg": "JPEG",
               ".JPG": "JPEG"}
    for i, (suffix, fmt) in enumerate(formats.items()):
        square(root / "dark" / "more" / "deeper" / f"n{i}{suffix}", 30, fmt=fmt)
    data = load_image_folder(root)
    assert len(data.train_labels) + len(data.test_labels) == 4 + len(formats)
    assert int((torch.cat([data.train_labels, data.test_labels]) == 0).sum()) == 2 + len(formats)
    assert capsys.readouterr().err == ""                         # nothing left out, nothing to say


def test_bad_files_are_reported_once_or_refused(tmp_path, capsys):
    root = two_classes(tmp_path / "pics", per_class=5)
    (root / "dark" / "notes.txt").write_text("not an image")
    (root / "light" / "broken.png").write_bytes((root / "light" / "0.png").read_bytes()[:40])   # header only
    (root / "light" / "empty.jpg").write_bytes(b"")
    os.mkfifo(root / "dark" / "pipe.png")                        # opening it would block: never opened
    data = load_image_folder(root)
    assert len(data.train_labels) + len(data.test_labels) == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainkit: warning: 4 of 14 files in"), err
    for name in ("notes.txt (not an image)", "pipe.png (not a regular file)"):
        assert name in err[0]
    assert "and 1 more" in err[0]
    with pytest.raises(TrainkitError) as refused:
        load_image_folder(root, bad_files="error")
    assert "4 of 14 files" in str(refused.value) and "--bad-files skip" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_the_size_chosen_is_said_once(tmp_path, capsys):
    root = two_classes(tmp_path / "pics")
    square(root / "dark" / "odd.png", 30, size=(20, 16))
    data = load_image_folder(root)
    assert data.image_shape == (1, 12, 12)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Image folder")]
    assert len(lines) == 1 and "grayscale 12x12 (the most common size" in lines[0] and "fit" in lines[0], lines


def test_resizing_keeps_the_aspect_ratio_unless_stretch_is_asked(tmp_path):
    root = two_classes(tmp_path / "pics")
    wide = np.zeros((12, 24, 3), np.uint8)          # red | green (the centre 12x12) | blue
    wide[:, :6], wide[:, 6:18], wide[:, 18:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).save(root / "dark" / "wide.png")
    for resize, expect_edges in (("fit", False), ("stretch", True)):
        data = load_image_folder(root, channels=3, size=(12, 12), resize=resize, test_fraction=0.01)
        images = torch.cat([data.train_images, data.test_images])
        colour = images[((images[:, 1] > 200) & (images[:, 0] < 50)).flatten(1).any(1)]   # the one with green
        assert len(colour) == 1
        red_or_blue = bool((colour[0, 0] > 128).any() or (colour[0, 2] > 128).any())      # its edges
        assert red_or_blue == expect_edges, resize


def test_train_test_and_val_folders_are_the_split(tmp_path):
    for part, n in (("train", 4), ("test", 2), ("val", 3)):
        two_classes(tmp_path / "pics" / part, per_class=n)
    cfg = TrainConfig(dataset=f"imagefolder:{tmp_path / 'pics'}", progress=False)
    memory = get_data(cfg.replace(pipeline="tensor"))
    assert (len(memory.train_labels), len(memory.val_labels), len(memory.test_labels)) == (8, 6, 4)
    streamed = get_data(cfg.replace(pipeline="stream"))
    assert streamed.streamed
    assert torch.equal(streamed.val_labels, memory.val_labels) and torch.equal(streamed.test_labels, memory.test_labels)
    from trainkit.run.experiment import held_out
    with pytest.raises(TrainkitError, match="has its own validation split"):
        held_out(cfg.replace(val_split=0.1), memory)


def test_the_streamed_path_leaves_out_the_same_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAINKIT_STREAM_WORKERS", "0")
    root = two_classes(tmp_path / "pics", per_class=5)
    (root / "dark" / "notes.txt").write_text("not an image")
    (root / "light" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)   # no readable header
    cfg = TrainConfig(dataset=f"imagefolder:{root}", progress=False)
    memory, streamed = get_data(cfg.replace(pipeline="tensor")), get_data(cfg.replace(pipeline="stream"))
    assert torch.equal(memory.train_labels, streamed.train_labels)
    assert torch.equal(memory.test_labels, streamed.test_labels)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and all("2 of 12 files" in line for line in warnings)


@pytest.mark.slow
def test_bad_files_error_through_the_cli_is_one_line(tmp_path):
    root = two_classes(tmp_path / "pics")
    (root / "dark" / "notes.txt").write_text("not an image")
    proc = run_cli("train", "--dataset", f"imagefolder:{root}", "--bad-files", "error", "--epochs", "1",
                   "--no-progress", "--out", tmp_path / "run")
    assert_one_line_error(proc, "1 of 9 files", "notes.txt (not an image)", "--bad-files skip")


def test_a_folder_reads_16_bit_exif_and_alpha_images_as_a_viewer_shows_them(tmp_path):
    root = two_classes(tmp_path / "pics", per_class=3)
    ramp = np.linspace(0, 65535, 12 * 12).reshape(12, 12).astype(np.uint16)
    Image.fromarray(ramp).save(root / "dark" / "ramp16.png")                   # 16-bit greys
    wide = np.zeros((12, 24), np.uint8)
    wide[:, :12] = 255                                                         # stored landscape, left half white
    exif = Image.Exif()
    exif[0x0112] = 6                                                           # shown turned: top half white
    Image.fromarray(wide).save(root / "dark" / "turned.jpg", exif=exif, quality=95)
    rgba = np.zeros((12, 12, 4), np.uint8)
    rgba[3:9, 3:9] = (0, 0, 0, 255)                                            # a black square on transparency
    Image.fromarray(rgba, "RGBA").save(root / "light" / "alpha.png")
    data = load_image_folder(root, channels=1, size=(24, 12), resize="stretch", test_fraction=0.01)
    images = torch.cat([data.train_images, data.test_images])
    names = data.files["train"] + data.files["test"]
    ramp_read, turned, alpha = (images[names.index(f"{c}/{n}")][0] for c, n in
                                (("dark", "ramp16.png"), ("dark", "turned.jpg"), ("light", "alpha.png")))
    assert len(torch.unique(ramp_read)) > 100                                  # not binarised
    assert turned[:12].float().mean() > 200 and turned[12:].float().mean() < 50
    assert alpha[0, 0] == 255 and alpha[12, 6] < 30                           # white around a black square


def test_a_class_folder_linked_to_another_is_read_once(tmp_path, capsys):
    root = two_classes(tmp_path / "pics" / "train")
    two_classes(tmp_path / "pics" / "test", per_class=2)
    (root / "dark2").symlink_to(root / "dark")                   # the same images under a second name
    (root / "all").symlink_to(root)                              # a link above every class folder
    elsewhere = two_classes(tmp_path / "kept" / "outside", per_class=3) / "light"
    (root / "mid").symlink_to(elsewhere)                         # a link to a folder elsewhere: a class
    square(tmp_path / "pics" / "test" / "mid" / "0.png", 128)
    for pipeline in ("tensor", "stream"):
        data = get_data(TrainConfig(dataset=f"imagefolder:{tmp_path / 'pics'}", progress=False, pipeline=pipeline))
        assert data.classes == ["dark", "light", "mid"], pipeline
        assert torch.bincount(data.train_labels).tolist() == [4, 4, 3], pipeline
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"trainkit: warning: 2 class folders in {tmp_path / 'pics'} lead to another")
        assert "all (leads to dark)" in warnings[0] and "dark2 (leads to dark)" in warnings[0]
        assert "left out" in warnings[0]


def test_a_test_class_folder_linked_to_a_training_one_is_said(tmp_path, capsys):
    root = tmp_path / "pics"
    two_classes(root / "train")
    two_classes(root / "test", per_class=2)
    (root / "test" / "light").rename(tmp_path / "elsewhere")
    (root / "test" / "light").symlink_to(root / "train" / "light")     # the test images are training images
    data = load_image_folder(root)
    assert data.classes == ["dark", "light"] and len(data.test_labels) == 6      # read, as asked
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"trainkit: warning: 1 held-out class folder in {root} leads to training images through a "
                   f"link: test/light (leads to train/light); those images are in both splits, so their accuracy "
                   f"is not a held-out one"], err


def test_an_empty_class_folder_is_named_in_one_warning(tmp_path, capsys):
    root = two_classes(tmp_path / "pics")
    (root / "birds").mkdir()
    (root / "fish" / "sub").mkdir(parents=True)
    (root / "fish" / "readme.txt").write_text("no images yet")      # not an image: still no class
    data = load_image_folder(root)
    assert data.classes == ["dark", "light"]
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    named = [line for line in err if "no image file" in line]
    assert named == [f"trainkit: warning: 2 class folders in {root} hold no image file (birds, fish): "
                     f"no class is made for them"], err
    # a class with images in test/ but none in train/ is a class (the empty-class warning of a run names it)
    two_classes(tmp_path / "split" / "train")
    two_classes(tmp_path / "split" / "test")
    (tmp_path / "split" / "train" / "owls").mkdir()
    square(tmp_path / "split" / "test" / "owls" / "0.png", 90)
    assert split_folder(tmp_path / "split").warnings == []
    # the only other class folder empty: the refusal comes after the warning that explains it
    (root / "light").rename(tmp_path / "moved")
    with pytest.raises(TrainkitError, match="needs at least two class subfolders"):
        load_image_folder(root)
    assert "(birds, fish)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_file_given_as_the_image_folder_is_called_a_file(tmp_path):
    square(tmp_path / "one.png", 40)
    proc = run_cli("train", "--dataset", f"imagefolder:{tmp_path / 'one.png'}", "--epochs", "1", "--no-progress",
                   "--out", tmp_path / "run")
    assert_one_line_error(proc, f"image folder {tmp_path / 'one.png'} is a file, not a folder")
    assert "does not exist" not in proc.stderr


@pytest.mark.slow
def test_the_sizes_said_with_a_validation_split_add_up(tmp_path):
    root = two_classes(tmp_path / "pics", per_class=10)
    proc = run_cli("train", "--dataset", f"imagefolder:{root}", "--val-split", "0.25", "--epochs", "1",
                   "--model", "compact", "--no-progress", "--precision", "fp32", "--channels-last", "off",
                   "--compile", "off", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = next(line for line in proc.stdout.splitlines() if line.startswith("Image folder"))
    assert "16 training, 4 test images" in folder                  # the folder: 20 images, 20% for testing
    said = [line for line in proc.stdout.splitlines() if line.startswith("Validation split")]
    assert said == ["Validation split (--val-split 0.25): 4 of the 16 training images held out; the run reads "
                    "12 training, 4 validation and 4 test images"], proc.stdout
    assert "Validation set: Average loss" in proc.stdout and "Accuracy: " in proc.stdout
    assert "/4 (" in proc.stdout.split("Validation set")[1].splitlines()[0]      # scored on the 4 said
