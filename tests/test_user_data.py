"""Users' data in the forms they have it: mnist:DIR means DIR's files; csv:, npz: and hf: read small
files written here in the real formats (pandas' CSV, numpy.savez, the datasets package's
save_to_disk and the Hub's parquet files); eval RUN --dataset SPEC; predict on folders and CSVs."""
import csv
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli_ok, run_cli
from trainkit import TrainConfig
from trainkit.data import DATASETS, load_dataset
from trainkit.data.formats import encode_idx
from trainkit.data.idx import FASHION_MNIST, MNIST, write_own_idx
from trainkit.errors import TrainkitError
from trainkit.run.training import train

SMALL = dict(model="compact", epochs=1, batch_size=8, progress=False, device="cpu", precision="fp32",
             channels_last="off", compile="off")


def kaggle_csv(path: Path, labels, pixels, with_labels: bool = True) -> Path:
    """Kaggle's digit-recognizer layout: label,pixel0,...,pixelN-1 (the label column left out for a test file)."""
    import pandas as pd
    table = pd.DataFrame(np.asarray(pixels).reshape(len(pixels), -1))
    table.columns = [f"pixel{i}" for i in range(table.shape[1])]
    if with_labels:
        table.insert(0, "label", labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def digits(mnist, n: int, start: int = 0):
    """n MNIST test images (N, 28, 28) uint8 and their labels."""
    return mnist.test_images[start:start + n, 0].numpy(), mnist.test_labels[start:start + n].numpy()


# ---------------------------------------------------------------------------------------------
# mnist:DIR reads DIR; a user's files in a published set's folder are pointed to idx:DIR

def test_mnist_dir_reads_the_files_in_dir_with_the_sets_class_names(tmp_path):
    own = write_own_idx(tmp_path / "own")             # 24 + 12 images of noise, labels 0-2
    data = load_dataset(f"mnist:{own}", tmp_path / "unused", progress=False)
    assert len(data.train_labels) == 24 and len(data.test_labels) == 12          # not the published 60,000
    assert data.classes == list(MNIST.classes) and data.name == f"mnist:{own}"
    assert set(data.sources) == {p.name for p in own.iterdir()}                   # data.json lists DIR's files
    fashion = load_dataset(f"fashion-mnist:{own}", tmp_path / "unused", progress=False)
    assert fashion.classes == list(FASHION_MNIST.classes)
    assert torch.equal(fashion.train_images, data.train_images)


def test_mnist_dir_that_holds_the_published_layout_points_to_data_dir(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(TrainkitError, match=r"reads your own IDX files .* use --dataset mnist --data-dir"):
        load_dataset(f"mnist:{tmp_path}", tmp_path, progress=False)
    with pytest.raises(TrainkitError, match="no such folder"):
        load_dataset(f"kmnist:{tmp_path / 'absent'}", tmp_path, progress=False)


def test_own_idx_files_in_the_published_folder_point_to_idx(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)     # a user's, not MNIST's
    (raw / "train-images-idx3-ubyte").write_bytes(encode_idx(images))
    proc = run_cli("train", "--dataset", "mnist", "--data-dir", tmp_path, "--epochs", "1", "--out", tmp_path / "run")
    line = assert_one_line_error(proc, "train-images-idx3-ubyte", "it is not the published mnist",
                                 f"--dataset idx:{raw}")
    assert line.index("idx:") < line.index("delete it")          # the user's route first


# ---------------------------------------------------------------------------------------------
# csv:FILE and csv:DIR

def test_kaggle_csv_folder_trains_from_train_csv_and_holds_out_a_test_split(tmp_path, mnist, capsys):
    x, y = digits(mnist, 50)
    kaggle_csv(tmp_path / "kaggle" / "train.csv", y, x)
    kaggle_csv(tmp_path / "kaggle" / "test.csv", None, x[:7], with_labels=False)
    data = load_dataset(f"csv:{tmp_path / 'kaggle'}", tmp_path, progress=False, seed=3)
    assert data.image_shape == (1, 28, 28) and data.classes == [str(i) for i in range(10)]
    assert (len(data.train_labels), len(data.test_labels)) == (40, 10) and data.held_out_test
    everything = torch.cat([data.train_images, data.test_images])
    assert sorted(map(bytes, everything.flatten(1).numpy())) == sorted(map(bytes, x.reshape(50, -1)))
    assert "test.csv has no label column, so it is not the test split" in capsys.readouterr().out
    assert set(data.sources) == {"train.csv"}


def test_labelled_test_csv_is_the_test_split_and_shapes_come_from_the_columns(tmp_path, mnist):
    x, y = digits(mnist, 30)
    kaggle_csv(tmp_path / "d" / "fashion-mnist_train.csv", y[:20], x[:20])
    kaggle_csv(tmp_path / "d" / "fashion-mnist_test.csv", y[20:], x[20:])
    data = load_dataset(f"csv:{tmp_path / 'd'}", tmp_path, progress=False)
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(x[20:])) and not data.held_out_test
    assert data.test_labels.tolist() == y[20:].tolist()
    colour = np.random.default_rng(1).integers(0, 256, (6, 3, 32, 32))          # 3,072 columns: 3x32x32, CIFAR's order
    kaggle_csv(tmp_path / "colour.csv", ["cat", "dog"] * 3, colour)
    data = load_dataset(f"csv:{tmp_path / 'colour.csv'}", tmp_path, progress=False)
    assert data.image_shape == (3, 32, 32) and data.classes == ["cat", "dog"]
    kaggle_csv(tmp_path / "wide.csv", [0, 1] * 3, np.zeros((6, 10, 20)))       # 200 columns: no square
    with pytest.raises(TrainkitError, match="make no square image .* give --image-size HxW"):
        load_dataset(f"csv:{tmp_path / 'wide.csv'}", tmp_path, progress=False)
    assert load_dataset(f"csv:{tmp_path / 'wide.csv'}", tmp_path, size=(10, 20), progress=False).image_shape == (1, 10, 20)


@pytest.mark.parametrize("content, message", [
    ("label,p0,p1,p2,p3\n0,1,2,3,4\n1,5,6,7,300\n", "holds pixel values from 1 to 300"),
    ("label,p0,p1,p2,p3\n0,1,2,3,x\n1,5,6,7,8\n", "column p3 holds text"),
    ("label,p0,p1,p2,p3\n0,1,2,3,\n1,5,6,7,8\n", "NaN or infinite pixel values"),
    ("p0,p1,p2,p3\n1,2,3,4\n", "has no label column"),
    ("label,p0,p1,p2,p3\n", "holds no rows"),
])
def test_csv_files_that_are_not_pixel_rows_are_one_line(tmp_path, content, message):
    (tmp_path / "bad.csv").write_text(content)
    assert_one_line_error(run_cli("train", "--dataset", f"csv:{tmp_path / 'bad.csv'}", "--out", tmp_path / "run"),
                          message)


def test_float_pixels_in_0_1_are_scaled(tmp_path):
    (tmp_path / "f.csv").write_text("label,a,b,c,d\n0,0.0,0.5,1.0,0.25\n1,1,1,1,1\n0,0,0,0,0\n1,0,0,0,0\n0,0,0,0,0\n")
    data = load_dataset(f"csv:{tmp_path / 'f.csv'}", tmp_path, progress=False)
    values = torch.cat([data.train_images, data.test_images]).flatten().tolist()
    assert 128 in values and 64 in values and max(values) == 255


# ---------------------------------------------------------------------------------------------
# npz:FILE

def test_npz_in_keras_and_in_images_labels_layouts(tmp_path, mnist):
    x, y = digits(mnist, 30)
    np.savez(tmp_path / "k.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    data = load_dataset(f"npz:{tmp_path / 'k.npz'}", tmp_path, progress=False)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(x[:20])) and data.test_labels.tolist() == y[20:].tolist()
    rgb = np.random.default_rng(2).random((10, 8, 8, 3)).astype(np.float32)     # floats in [0, 1], channels last
    np.savez_compressed(tmp_path / "c.npz", images=rgb, labels=(np.arange(10) % 2)[:, None],   # (N, 1): keras's CIFAR
                        classes=np.array(["no", "yes"]))
    data = load_dataset(f"npz:{tmp_path / 'c.npz'}", tmp_path, progress=False)
    assert data.image_shape == (3, 8, 8) and data.classes == ["no", "yes"] and len(data.test_labels) == 2
    both = torch.cat([data.train_images, data.test_images])
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, np.rint(rgb * 255).astype(np.uint8).transpose(0, 3, 1, 2)))


def test_npz_object_arrays_are_refused_unpickled_never(tmp_path):
    np.savez(tmp_path / "o.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, "two", None], dtype=object))
    assert_one_line_error(run_cli("train", "--dataset", f"npz:{tmp_path / 'o.npz'}", "--out", tmp_path / "run"),
                          "holds an array of Python objects")
    np.savez(tmp_path / "w.npz", pictures=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(TrainkitError, match="holds pictures; npz: reads x_train, y_train"):
        load_dataset(f"npz:{tmp_path / 'w.npz'}", tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# hf:DIR

def hf_dataset(mnist, n: int = 20):
    """A DatasetDict of MNIST PNGs with a ClassLabel of the digits' names (features as the Hub's mnist)."""
    datasets = pytest.importorskip("datasets")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    def png(a):
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    x, y = digits(mnist, n)
    split = lambda s: datasets.Dataset.from_dict({"image": [png(a) for a in x[s]], "label": y[s].tolist()},
                                                 features=features)
    return datasets.DatasetDict({"train": split(slice(0, n - 5)), "test": split(slice(n - 5, n))}), x, y, names


@pytest.mark.parametrize("layout", ["save_to_disk", "hub parquet"])
def test_hf_dataset_on_disk_is_read_with_its_class_names(tmp_path, mnist, layout):
    dataset, x, y, names = hf_dataset(mnist)
    if layout == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "hf"))
    else:
        (tmp_path / "hf" / "data").mkdir(parents=True)
        for split in dataset:
            dataset[split].to_parquet(str(tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet"))
    data = load_dataset(f"hf:{tmp_path / 'hf'}", tmp_path, progress=False)
    assert data.classes == names and data.image_shape == (1, 28, 28)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(x[:15])) and data.test_labels.tolist() == y[15:].tolist()
    assert data.sources and all(size > 0 for size, _ in data.sources.values())


def test_hf_hub_name_offline_is_one_line_at_once(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    proc = run_cli("train", "--dataset", "hf:ylecun/mnist", "--out", tmp_path / "run", cwd=tmp_path)
    line = assert_one_line_error(proc, "hf:ylecun/mnist", "save_to_disk")
    assert time.monotonic() - start < 30 and ("needs the network" in line or "reads a dataset saved on disk" in line)


# ---------------------------------------------------------------------------------------------
# every new source: --limit-train, --val-split, data.json, eval, and changed data refused

@pytest.mark.slow
@pytest.mark.parametrize("source", ["csv", "npz", "hf"])
def test_new_sources_record_their_files_and_refuse_changed_data(tmp_path, source):
    if source == "hf":
        pytest.importorskip("datasets")
    example = DATASETS[source].example(tmp_path)
    out = tmp_path / "run"
    train(TrainConfig(dataset=example.dataset, limit_train=12, val_split=0.25, **SMALL), out=out)
    import json
    manifest = json.loads((out / "data.json").read_text())
    assert manifest["dataset"].startswith(f"{source}:/") and manifest["splits"]["train"]["count"] == 9
    assert manifest["splits"]["val"]["count"] == 3 and manifest["files"]
    assert "Accuracy" in cli_ok("eval", out).stdout
    given = Path(example.dataset.partition(":")[2])
    changed = next(p for p in sorted([given, *given.glob("**/*")]) if p.is_file()
                   and p.name in {Path(n).name for n in manifest["files"]})
    raw = bytearray(changed.read_bytes())
    if source == "csv":                   # one pixel of the first row, still a valid CSV
        text = changed.read_text().splitlines()
        first = text[1].split(",")
        first[5] = str((int(first[5]) + 1) % 256)
        changed.write_text("\n".join([text[0], ",".join(first), *text[2:]]) + "\n")
    else:                                 # rewritten with one image changed: valid, other data
        rewrite_one_image(source, changed, example)
    assert_one_line_error(run_cli("eval", out), "is not what", "eval refuses to use different data")
    resumed = run_cli("train", "--resume", out, "--epochs", "2")   # (a warning on a 3-image validation split may come first)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    assert "is not what" in resumed.stderr.splitlines()[-1] and "--resume refuses" in resumed.stderr.splitlines()[-1]
    assert raw != changed.read_bytes()


def rewrite_one_image(source: str, path: Path, example) -> None:
    if source == "npz":
        arrays = dict(np.load(path))
        arrays["x_train"][0] = 255 - arrays["x_train"][0]
        np.savez(path, **arrays)
    else:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        images = table.column("image").to_pylist()
        buffer = io.BytesIO()
        Image.new("L", (28, 28), 7).save(buffer, format="PNG")
        images[0] = {"bytes": buffer.getvalue(), "path": None}
        import pyarrow as pa
        table = table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type))
        pq.write_table(table, path)


# ---------------------------------------------------------------------------------------------
# eval RUN --dataset SPEC

@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, mnist):
    """A run trained on an image folder (train/, test/) of MNIST PNGs, and those test images as a
    flat folder of their own."""
    root = tmp_path_factory.mktemp("eval")
    for split, start, n in (("train", 0, 120), ("test", 200, 40)):
        x, y = digits(mnist, n, start)
        for i, (image, label) in enumerate(zip(x, y)):
            for where in [root / "pics" / split] + ([root / "new"] if split == "test" else []):
                (where / str(label)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(where / str(label) / f"{i:03d}.png")
    proc = cli_ok("train", "--dataset", f"imagefolder:{root / 'pics'}", "--out", root / "run", "--epochs", "1",
                  "--model", "compact", "--batch-size", "16", "--precision", "fp32", "--channels-last", "off",
                  "--no-progress")
    return root, proc


def test_eval_on_another_folder_scores_it_as_training_scored_the_same_images(folder_run):
    root, trained = folder_run
    proc = cli_ok("eval", root / "run", "--dataset", f"imagefolder:{root / 'new'}")
    trained_line = [line for line in trained.stdout.splitlines() if line.startswith("Test set")][-1]
    scored = [line for line in proc.stdout.splitlines() if line.startswith("Test set")][-1]
    assert scored.split("Accuracy:")[1] == trained_line.split("Accuracy:")[1]      # the same 40 images, all of them
    assert abs(float(scored.split("loss: ")[1].split(",")[0]) - float(trained_line.split("loss: ")[1].split(",")[0])) < 2e-4
    assert "40 images (all of it)" in proc.stdout


def test_eval_on_a_set_of_other_classes_or_shape_is_one_line(folder_run, tmp_path):
    root, _ = folder_run
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (28, 28), i * 40).save(tmp_path / "pets" / name / f"{i}.png")
    assert_one_line_error(run_cli("eval", root / "run", "--dataset", f"imagefolder:{tmp_path / 'pets'}"),
                          "has classes the run", "cat, dog")
    np.savez(tmp_path / "big.npz", images=np.zeros((6, 32, 32), np.uint8), labels=np.arange(6) % 2)
    assert_one_line_error(run_cli("eval", root / "run", "--dataset", f"npz:{tmp_path / 'big.npz'}"),
                          "holds images of 1x32x32", "reads 1x28x28")


# ---------------------------------------------------------------------------------------------
# predict RUN FOLDER|FILE.csv|FILES --output --format kaggle

def test_predict_walks_folders_reports_non_images_in_one_line_and_writes_a_csv(folder_run, tmp_path):
    root, _ = folder_run
    shutil.copytree(root / "new", tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "3" / "broken.png").write_bytes(b"\x89PNG broken")
    proc = cli_ok("predict", root / "run", tmp_path / "in", "--output", tmp_path / "preds.csv")
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "2 file(s) left out" in warnings[0] and "notes.txt (not an image)" in warnings[0]
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and list(rows[0]) == ["file", "class", "probability"]
    assert all(row["class"] in [str(i) for i in range(10)] and 0 < float(row["probability"]) <= 1 for row in rows)
    assert rows[0]["file"].endswith("0/000.png") or "/0/" in rows[0]["file"]
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli_ok("predict", root / "run", empty, tmp_path / "in" / "0")
    assert "empty (a folder that holds no file)" in proc.stderr and proc.stdout.count("%") >= 3


def test_predict_kaggle_test_csv_writes_a_submission(folder_run, tmp_path, mnist):
    root, _ = folder_run
    x, _ = digits(mnist, 25, 500)
    test_csv = kaggle_csv(tmp_path / "test.csv", None, x, with_labels=False)
    cli_ok("predict", root / "run", test_csv, "--output", tmp_path / "submission.csv", "--format", "kaggle")
    with open(tmp_path / "submission.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ImageId", "Label"] and [int(r[0]) for r in rows[1:]] == list(range(1, 26))
    assert {r[1] for r in rows[1:]} <= {str(i) for i in range(10)}
    printed = cli_ok("predict", root / "run", test_csv, "--top", "1").stdout.splitlines()     # the same top classes
    assert [line.split(": ")[1].split()[0] for line in printed] == [r[1] for r in rows[1:]]
    assert_one_line_error(run_cli("predict", root / "run", root / "new" / "0", "--output", tmp_path / "k.csv",
                                  "--format", "kaggle"), "--format kaggle writes ImageId,Label for the rows of one CSV")
    assert_one_line_error(run_cli("predict", root / "run", test_csv, "--format", "kaggle"), "give --output")


# ---------------------------------------------------------------------------------------------
# the nearest route, in the one line that refuses a format

@pytest.mark.parametrize("name, route", [("data.csv", "--dataset csv:data.csv"), ("x.npz", "--dataset npz:x.npz"),
                                         ("tfrecords", "ImageData.from_datasets")])
def test_an_unknown_dataset_names_the_nearest_route(tmp_path, name, route):
    assert_one_line_error(run_cli("train", "--dataset", name, "--out", tmp_path / "run"), "unknown dataset", route)


# ---------------------------------------------------------------------------------------------
# 32-bit and float images: one rule for a whole dataset, recorded, and the same at predict

def deep_folder(root: Path, dtype, maxima) -> Path:
    """Two classes of 8x8 TIFFs, each holding the value 250 (or 0.75 for floats) at (0, 0) and its
    own maximum at (7, 7)."""
    mark = 0.75 if dtype == np.float32 else 250
    for label in ("a", "b"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i, top in enumerate(maxima):
            values = np.zeros((8, 8), dtype)
            values[0, 0], values[7, 7] = mark, top
            Image.fromarray(values, "F" if dtype == np.float32 else "I").save(root / label / f"{i}.tif")
    return root


@pytest.mark.parametrize("dtype, maxima, white", [(np.int32, [250, 1000, 70000], 70000.0),
                                                  (np.float32, [1.0, 1.5], 1.5)])
def test_deep_images_of_one_folder_are_read_by_one_rule(tmp_path, capsys, dtype, maxima, white):
    root = deep_folder(tmp_path / "deep", dtype, maxima)
    data = load_dataset(f"imagefolder:{root}", tmp_path, progress=False)
    images = torch.cat([data.train_images, data.test_images])
    assert len(set(images[:, 0, 0, 0].tolist())) == 1                     # the same stored value, one grey
    assert images[:, 0, 7, 7].max() == 255                                # the dataset's maximum is white
    rule = data.deep.integer if dtype == np.int32 else data.deep.floating
    assert rule == white and "as white, one rule for every image of the dataset" in capsys.readouterr().out
    assert data.manifest()["deep_images"] == data.deep.to_dict()


@pytest.mark.slow
def test_predict_reads_deep_images_by_the_runs_rule(tmp_path):
    from trainkit.commands.inference import load_run, prepare_files
    root = deep_folder(tmp_path / "deep", np.float32, [1.0, 1.5, 3.0])
    train(TrainConfig(dataset=f"imagefolder:{root}", **SMALL), out=tmp_path / "run")
    trained = load_run(tmp_path / "run")
    assert trained.deep.floating == 3.0                                   # data.json's rule
    image = prepare_files(trained, [root / "a" / "0.tif"])[0][0]
    assert image[0, 0, 0] == round(0.75 * 255 / 3.0)                      # as training read it, not 0.75 * 255
    data = load_dataset(f"imagefolder:{root}", tmp_path, progress=False)
    decoded = torch.cat([data.train_images, data.test_images])[:, 0, 0, 0]
    assert set(decoded.tolist()) == {int(image[0, 0, 0])}


def test_an_image_folder_of_other_files_names_the_routes(tmp_path):
    (tmp_path / "arrays" / "a").mkdir(parents=True)
    np.save(tmp_path / "arrays" / "a" / "x.npy", np.zeros(3))
    proc = run_cli("train", "--dataset", f"imagefolder:{tmp_path / 'arrays'}", "--out", tmp_path / "run")
    line = proc.stderr.splitlines()[-1]          # after the warning on the class folder without images
    assert proc.returncode == 2 and line.startswith("trainkit: error: ") and "needs at least two class" in line
    assert "csv:FILE" in line and "npz:FILE" in line and "ImageData.from_datasets" in line
    kaggle_csv(tmp_path / "train.csv", [0, 1], np.zeros((2, 4, 4)))
    assert_one_line_error(run_cli("train", "--dataset", f"imagefolder:{tmp_path / 'train.csv'}", "--out",
                                  tmp_path / "run"), "is a file, not a folder", f"--dataset csv:{tmp_path / 'train.csv'}")
