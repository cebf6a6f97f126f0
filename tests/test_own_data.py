"""Your own files in a known format: --dataset cifar10:DIR / cifar100:DIR (CIFAR's python pickles,
checked by structure) and idx:DIR (four IDX files), written here in the real formats."""
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from trainkit import TrainConfig
from trainkit.data import load_dataset
from trainkit.data.cifar import CIFAR10, CIFAR100
from trainkit.data.formats import encode_idx
from trainkit.data.idx import write_own_idx
from trainkit.errors import TrainkitError
from trainkit.run.training import train


def dump(path: Path, content: dict) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))


def own_cifar10(folder: Path, batches=(6, 5), test: int = 4, classes=("cat", "dog", "eel")) -> Path:
    """A user's CIFAR-10-format folder: two data_batch files, test_batch, batches.meta, 3 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i + 1}", n) for i, n in enumerate(batches)] + [("test_batch", test)]:
        labels = (np.arange(n) % len(classes)).tolist()
        images = (np.array(labels)[:, None] * 100 + rng.integers(0, 30, (n, 3072))).astype(np.uint8)
        dump(folder / name, {b"data": images, b"labels": labels, b"batch_label": b"mine"})
    dump(folder / "batches.meta", {b"label_names": [c.encode() for c in classes]})
    return folder


def test_own_cifar10_files_are_read_by_structure(tmp_path):
    folder = own_cifar10(tmp_path / "mine")
    data = load_dataset(f"cifar10:{folder}", tmp_path / "unused", progress=False)
    assert data.classes == ["cat", "dog", "eel"] and data.image_shape == (3, 32, 32)
    assert len(data.train_labels) == 11 and len(data.test_labels) == 4
    assert data.mean != CIFAR10.mean and max(data.mean) < 0.5           # its own statistics
    assert data.sources.keys() == {"data_batch_1", "data_batch_2", "test_batch", "batches.meta"}
    (tmp_path / "up" / "cifar-10-batches-py").mkdir(parents=True)          # DIR may hold the usual folder
    own_cifar10(tmp_path / "up" / "cifar-10-batches-py")
    assert load_dataset(f"cifar10:{tmp_path / 'up'}", tmp_path, progress=False).classes == ["cat", "dog", "eel"]


@pytest.mark.parametrize("damage, message", [
    ("shape", "does not hold images of 3x32x32 with their labels"),
    ("labels", "labels run 0-7, outside the 3 classes of batches.meta"),
    ("meta", "holds no list label_names"),
    ("missing", "holds no test_batch"),
])
def test_own_cifar_files_that_break_the_format_are_one_line(tmp_path, damage, message):
    folder = own_cifar10(tmp_path / "mine")
    if damage == "shape":
        dump(folder / "data_batch_2", {b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5})
    elif damage == "labels":
        dump(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 7]})
    elif damage == "meta":
        dump(folder / "batches.meta", {b"names": [b"a"]})
    else:
        (folder / "test_batch").unlink()
    with pytest.raises(TrainkitError) as info:
        load_dataset(f"cifar10:{folder}", tmp_path, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_own_cifar_is_unpickled_without_running_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = own_cifar10(tmp_path / "mine")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(TrainkitError, match="test_batch is not a file in CIFAR's format"):
        load_dataset(f"cifar10:{folder}", tmp_path, progress=False)
    assert not marker.exists()


def test_own_cifar_pickled_with_protocol_5_is_read_and_still_runs_no_code(tmp_path):
    folder = own_cifar10(tmp_path / "two")
    again = tmp_path / "five"
    again.mkdir()
    for path in folder.iterdir():                 # the same content, pickled by protocol 5 (numpy's _frombuffer)
        content = pickle.loads(path.read_bytes())
        raw = pickle.dumps(content, protocol=5)
        assert (b"_frombuffer" in raw) == (path.name != "batches.meta")
        (again / path.name).write_bytes(raw)
    two, five = (load_dataset(f"cifar10:{f}", tmp_path, progress=False) for f in (folder, again))
    assert torch.equal(two.train_images, five.train_images) and torch.equal(two.test_labels, five.test_labels)
    # a float array in Fortran order: the rebuilder keeps its dtype and order
    from trainkit.data.formats import unpickle_cifar
    fortran = np.arange(6, dtype=np.float32).reshape(2, 3).T
    back = unpickle_cifar(pickle.dumps({"x": fortran}, protocol=5), "f", "a file", "")["x"]
    assert np.array_equal(back, fortran) and back.dtype == np.float32

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class ObjectArray:                            # _frombuffer asked for Python objects
        def __reduce__(self):
            numeric = (getattr(np, "_core", None) or np.core).numeric          # numpy 2, or 1
            return (numeric._frombuffer, (b"\0" * 8, np.dtype(object), (1,), "C"))

    for hostile, why in ((Evil(), "system is not allowed"), (ObjectArray(), "not plain numbers")):
        (again / "test_batch").write_bytes(pickle.dumps({"data": hostile, "labels": [0]}, protocol=5))
        with pytest.raises(TrainkitError, match=f"test_batch is not a file in CIFAR's format .*{why}"):
            load_dataset(f"cifar10:{again}", tmp_path, progress=False)
    assert not marker.exists()
    # arrays written out of band (pickle.PickleBuffer kept apart) cannot come from one file: one line
    buffers = []
    (again / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]},
                                                    protocol=5, buffer_callback=buffers.append))
    assert buffers
    with pytest.raises(TrainkitError, match="test_batch is not a file in CIFAR's format .*out-of-band"):
        load_dataset(f"cifar10:{again}", tmp_path, progress=False)


def test_own_cifar10_says_what_it_read_and_which_batch_is_absent(tmp_path, capsys):
    folder = own_cifar10(tmp_path / "mine", batches=(3, 3, 3, 3, 3))
    load_dataset(f"cifar10:{folder}", tmp_path, progress=False)
    assert capsys.readouterr().out.strip() == f"cifar10:{folder}: read data_batch_1,2,3,4,5 and test_batch (15 + 4 images)"
    (folder / "data_batch_4").unlink()
    data = load_dataset(f"cifar10:{folder}", tmp_path, progress=False)
    assert len(data.train_labels) == 12
    assert capsys.readouterr().out.strip() == (f"cifar10:{folder}: read data_batch_1,2,3,5 and test_batch "
                                               f"(12 + 4 images); data_batch_4 absent")


def test_plain_cifar10_names_cifar10_dir_instead_of_advising_deletion(tmp_path):
    folder = own_cifar10(tmp_path / "data" / "cifar-10-batches-py", batches=(2, 2, 2, 2, 2))
    with pytest.raises(TrainkitError) as info:
        load_dataset("cifar10", tmp_path / "data", progress=False)      # the user's files, not the published ones
    message = str(info.value)
    assert "is corrupt (MD5" in message and f"--dataset cifar10:{folder}" in message
    assert "delete" not in message.lower()
    (folder / "data_batch_5").unlink()
    with pytest.raises(TrainkitError) as info:
        load_dataset("cifar10", tmp_path / "data", progress=False)
    assert "--dataset cifar10:" in str(info.value) and "delete" not in str(info.value).lower()


def test_own_cifar100_reads_fine_labels(tmp_path):
    folder = tmp_path / "c100"
    folder.mkdir()
    labels = list(range(0, 100, 10))
    dump(folder / "train", {b"data": np.zeros((10, 3072), np.uint8), b"fine_labels": labels, b"coarse_labels": [0] * 10})
    dump(folder / "test", {b"data": np.ones((2, 3072), np.uint8), b"fine_labels": [5, 99]})
    dump(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    data = load_dataset(f"cifar100:{folder}", tmp_path, progress=False)
    assert data.train_labels.tolist() == labels and data.classes[99] == "c99" and len(data.classes) == 100
    assert data.mean != CIFAR100.mean


def test_own_idx_files_are_read_gz_or_not(tmp_path):
    folder = write_own_idx(tmp_path / "idx", train=30, test=9, size=(20, 24))
    assert (folder / "train-images-idx3-ubyte.gz").is_file() and (folder / "t10k-images-idx3-ubyte").is_file()
    data = load_dataset(f"idx:{folder}", tmp_path, progress=False)
    assert data.image_shape == (1, 20, 24) and data.classes == ["0", "1", "2"]
    assert len(data.train_labels) == 30 and len(data.test_labels) == 9
    (folder / "t10k-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(8, np.uint8)))    # one label short
    with pytest.raises(TrainkitError, match=r"the test files hold images of shape \(9, 20, 24\) and labels of shape \(8,\)"):
        load_dataset(f"idx:{folder}", tmp_path, progress=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(TrainkitError, match="holds no t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{folder}", tmp_path, progress=False)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(np.zeros(9, np.uint8)))[:20])
    with pytest.raises(TrainkitError, match="truncated or corrupt"):
        load_dataset(f"idx:{folder}", tmp_path, progress=False)


def test_own_idx_extracted_and_gz_both_there_reads_the_extracted_and_says_when_they_differ(tmp_path, capsys):
    folder = write_own_idx(tmp_path / "idx", train=12, test=6, size=(8, 8))
    gz = folder / "train-images-idx3-ubyte.gz"
    extracted = folder / "train-images-idx3-ubyte"
    extracted.write_bytes(gzip.decompress(gz.read_bytes()))               # the same data twice: nothing to say
    same = load_dataset(f"idx:{folder}", tmp_path, progress=False)
    assert capsys.readouterr().err == ""
    other = np.full((12, 8, 8), 77, np.uint8)
    extracted.write_bytes(encode_idx(other))                              # now they differ
    for _ in range(2):                                                    # the same choice every time
        data = load_dataset(f"idx:{folder}", tmp_path, progress=False)
        assert (data.train_images == 77).all() and not (same.train_images == 77).all()
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err == [f"trainkit: warning: {folder} holds train-images-idx3-ubyte and train-images-idx3-ubyte.gz, "
                       f"which hold other data: read train-images-idx3-ubyte (the extracted file is read when both "
                       f"are there); remove the one you do not mean"]
    assert "train-images-idx3-ubyte" in data.sources and "train-images-idx3-ubyte.gz" not in data.sources
    gz.write_bytes(gz.read_bytes()[:30])                                  # a broken .gz beside it: said, not fatal
    load_dataset(f"idx:{folder}", tmp_path, progress=False)
    assert "the .gz cannot be read" in capsys.readouterr().err


def test_a_run_on_own_cifar_records_its_files(tmp_path):
    folder = own_cifar10(tmp_path / "mine", batches=(8, 8), test=6)
    cfg = TrainConfig(dataset=f"cifar10:{folder}", model="compact", epochs=1, batch_size=8, progress=False,
                      device="cpu", precision="fp32", channels_last="off")
    result = train(cfg, out=tmp_path / "run")
    assert result.run.cfg.dataset == f"cifar10:{folder.resolve()}"
    recorded = json.loads((tmp_path / "run" / "data.json").read_text())
    assert set(recorded["files"]) == {"data_batch_1", "data_batch_2", "test_batch", "batches.meta"}
