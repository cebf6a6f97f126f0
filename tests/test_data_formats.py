"""Datasets beyond MNIST, on small files written in each dataset's real on-disk format: CIFAR-10/100
(torchvision's python pickles), KMNIST (gzipped IDX), EMNIST (IDX files, and NIST's zip of them),
image folders in colour and at any size; the natural images' augmentation; end to end, zoo models
on CIFAR-format data and on an RGB folder."""
import csv
import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_one_line_error, cli_ok, run_cli
from trainkit import TrainConfig
from trainkit.data import cifar, idx
from trainkit.data.loaders import FlipCrop, SeedAugment, TensorLoader, torchvision_loader
from trainkit.data.cifar import CifarFile
from trainkit.data.idx import IdxFile
from trainkit.data.registry import load_dataset
from trainkit.errors import TrainkitError
from trainkit.run.experiment import augmentation, make_loaders

md5 = lambda data: hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Writers of the real formats

def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)    # the published files: protocol 2, bytes keys


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 40, n_test: int = 20, seed: int = 0):
    """Small CIFAR files in torchvision's python format: images whose colour says their class.
    Returns the spec with these files' names, sizes and MD5s, and the (images, labels) written."""
    spec = cifar.CIFAR_DATASETS[name] if name in cifar.CIFAR_DATASETS else cifar.CIFAR10
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    written = {}

    def batch(file_name, n):
        labels = rng.integers(0, classes, n)
        base = np.stack([labels * 25 % 256, 255 - labels * 25 % 256, labels * 7 % 256], 1)   # (n, 3)
        images = np.clip(base[:, :, None, None] + rng.integers(-20, 21, (n, 3, 32, 32)), 0, 255).astype(np.uint8)
        content = {b"batch_label": b"testing", b"data": images.reshape(n, 3072), b"filenames": [b"x.png"] * n}
        if name == "cifar10":
            content[b"labels"] = labels.tolist()
        else:
            content[b"fine_labels"], content[b"coarse_labels"] = labels.tolist(), (labels // 5).tolist()
        raw = _pickle(content)
        (folder / file_name).write_bytes(raw)
        written[file_name] = (images, labels)
        return CifarFile(file_name, md5(raw), n)

    train, test = batch(spec.train[0].name, n_train), batch(spec.test[0].name, n_test)
    key = spec.names_key.encode()
    meta_raw = _pickle({key: [f"class{i}".encode() for i in range(classes)], b"num_cases_per_batch": n_train})
    (folder / spec.meta.name).write_bytes(meta_raw)
    small = dataclasses.replace(spec, train=(train,), test=(test,), meta=CifarFile(spec.meta.name, md5(meta_raw), 0))
    return small, written


@pytest.fixture
def small_cifar(tmp_path, monkeypatch):
    """A data folder holding a small CIFAR-10 in its real format; `cifar10` reads it."""
    spec, written = write_cifar(tmp_path / "data")
    monkeypatch.setitem(cifar.CIFAR_DATASETS, "cifar10", spec)
    return tmp_path / "data", spec, written


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_kmnist(root: Path, n_train: int = 24, n_test: int = 12):
    """Small KMNIST .gz IDX files; returns the spec carrying their MD5s."""
    rng = np.random.default_rng(1)
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": np.arange(n_train) % 10,
              "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": np.arange(n_test) % 10}
    files = {}
    for key, item in idx.KMNIST.files.items():
        gz = gzip.compress(_idx(arrays[key]), mtime=0)
        (raw / (item.stem + ".gz")).write_bytes(gz)
        files[key] = IdxFile(item.stem, md5(gz), None, arrays[key].shape)
    return dataclasses.replace(idx.KMNIST, files=files), arrays


def write_rgb_folder(root: Path, per_class: int = 8, size=(40, 40), odd: int = 0) -> Path:
    """An image folder of coloured squares on a coloured background: red, green and blue classes;
    `odd` more images per class at 30x50, so the most common size is `size`."""
    rng = np.random.default_rng(2)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    for label, colour in colours.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class + odd):
            h, w = size if i < per_class else (30, 50)
            image = np.full((h, w, 3), (240, 230, 200), np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            image[y:y + h // 2, x:x + w // 2] = colour
            Image.fromarray(image).save(root / label / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------
# CIFAR

def test_cifar10_is_read_from_its_real_format(small_cifar):
    root, spec, written = small_cifar
    data = load_dataset("cifar10", root, progress=False)
    images, labels = written["data_batch_1"]
    assert data.image_shape == (3, 32, 32) and data.train_images.dtype == torch.uint8
    # The rows hold the red plane, then green, then blue: read as (3, 32, 32) exactly.
    assert torch.equal(data.train_images, torch.from_numpy(images))
    assert data.train_labels.tolist() == labels.tolist() and len(data.test_labels) == 20
    assert data.classes[:2] == ["class0", "class1"] and len(data.classes) == 10


def test_cifar100_reads_the_fine_labels(tmp_path, monkeypatch):
    spec, written = write_cifar(tmp_path, "cifar100")
    monkeypatch.setitem(cifar.CIFAR_DATASETS, "cifar100", spec)
    data = load_dataset("cifar100", tmp_path, progress=False)
    assert data.num_classes == 100 and data.train_labels.tolist() == written["train"][1].tolist()


def test_cifar_folder_layout_is_torchvisions():
    assert cifar.CIFAR10.folder == "cifar-10-batches-py" and cifar.CIFAR100.folder == "cifar-100-python"
    assert [f.name for f in cifar.CIFAR10.train] == [f"data_batch_{i}" for i in range(1, 6)]


def test_a_changed_cifar_file_is_refused_before_it_is_unpickled(small_cifar):
    root, spec, _ = small_cifar
    path = root / spec.folder / "test_batch"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TrainkitError, match=r"test_batch is corrupt \(MD5 .*, expected") as info:
        load_dataset("cifar10", root, progress=False)
    assert "\n" not in str(info.value)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    """Even with a matching checksum, only numpy arrays and plain data are unpickled."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    spec, _ = write_cifar(tmp_path)
    raw = pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=2)
    (tmp_path / spec.folder / "test_batch").write_bytes(raw)
    spec = dataclasses.replace(spec, test=(CifarFile("test_batch", md5(raw), 1),))
    monkeypatch.setitem(cifar.CIFAR_DATASETS, "cifar10", spec)
    with pytest.raises(TrainkitError, match="test_batch is not a cifar10 file"):
        load_dataset("cifar10", tmp_path, progress=False)
    assert not marker.exists()


def test_a_missing_cifar_file_is_one_line(small_cifar):
    root, spec, _ = small_cifar
    (root / spec.folder / "batches.meta").unlink()
    with pytest.raises(TrainkitError, match=r"cifar10 file batches.meta not found in .*cifar-10-batches-py"):
        load_dataset("cifar10", root, progress=False)


@pytest.fixture
def serve(tmp_path):
    """An HTTP server on 127.0.0.1 serving a folder, like the official mirrors."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_cifar_is_downloaded_checked_and_extracted(tmp_path, serve, monkeypatch):
    folder, url = serve
    spec, written = write_cifar(tmp_path / "made")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "made" / spec.folder, arcname=spec.folder)
        tar.addfile(tarfile.TarInfo("../outside"), io.BytesIO(b""))       # never extracted
    archive = buffer.getvalue()
    (folder / "cifar-10-python.tar.gz").write_bytes(archive)
    spec = dataclasses.replace(spec, archive=IdxFile("cifar-10-python.tar", md5(archive), None, ()))
    monkeypatch.setitem(cifar.CIFAR_DATASETS, "cifar10", spec)
    monkeypatch.setenv("TRAINKIT_MIRROR", url)
    data = load_dataset("cifar10", tmp_path / "data", progress=False)
    assert data.train_labels.tolist() == written["data_batch_1"][1].tolist()
    assert sorted(p.name for p in (tmp_path / "data" / spec.folder).iterdir()) == \
        ["batches.meta", "data_batch_1", "test_batch"]
    assert not (tmp_path / "outside").exists()
    # A mirror whose archive has another MD5: one line, nothing left behind.
    monkeypatch.setitem(cifar.CIFAR_DATASETS, "cifar10",
                        dataclasses.replace(spec, archive=IdxFile("cifar-10-python.tar", "0" * 32, None, ())))
    with pytest.raises(TrainkitError, match=r"could not be downloaded \(.*wrong MD5\)"):
        load_dataset("cifar10", tmp_path / "other", progress=False)
    assert not (tmp_path / "other" / spec.folder).exists()


def test_cifar_absent_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINKIT_MIRROR", "http://127.0.0.1:9/")     # nothing listens there
    with pytest.raises(TrainkitError) as info:
        load_dataset("cifar100", tmp_path, progress=False)
    message = str(info.value)
    assert "cifar-100-python.tar.gz is missing" in message and "cifar-100-python/" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# KMNIST (IDX, like MNIST)

def test_kmnist_reads_gz_idx_files(tmp_path, monkeypatch):
    spec, arrays = write_kmnist(tmp_path)
    monkeypatch.setitem(idx.IDX_DATASETS, "kmnist", spec)
    data = load_dataset("kmnist", tmp_path, progress=False)
    assert data.image_shape == (1, 28, 28) and data.classes[:3] == ["o", "ki", "su"]
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(arrays["test_images"].astype(np.uint8)))
    # No checksum of the extracted files is published: an extracted file alone is not used.
    raw = tmp_path / "KMNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TrainkitError, match="kmnist file t10k-labels-idx1-ubyte.gz not found"):
        idx.load_idx_dataset(spec, tmp_path, download=False)


# ---------------------------------------------------------------------------------------------
# EMNIST (IDX files in torchvision's layout, or NIST's gzip.zip that holds every split)

def emnist_arrays(spec, seed: int = 3) -> dict:
    """Upright images of a bar whose row says the label (so a transposed read shows), labels in the
    split's own numbering (letters from 1)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part in ("train", "test"):
        n = getattr(spec, part)
        labels = spec.label_offset + np.arange(n) % len(spec.classes)
        images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + label % 24, 3:25] = 255              # a horizontal bar: upright, not transposed
        arrays[part] = (images, labels)
    return arrays


def emnist_files(spec, arrays) -> dict[str, bytes]:
    """The split's four files as NIST stores them (images transposed), gzipped: name -> bytes."""
    files = {}
    for part, (images, labels) in arrays.items():
        files[spec.stem(part, "images-idx3") + ".gz"] = gzip.compress(_idx(images.transpose(0, 2, 1)), mtime=0)
        files[spec.stem(part, "labels-idx1") + ".gz"] = gzip.compress(_idx(labels), mtime=0)
    return files


def small_emnist(monkeypatch, split: str = "balanced", n_train: int = 30, n_test: int = 12):
    from trainkit.data import emnist
    spec = dataclasses.replace(emnist.SPLITS[split], train=n_train, test=n_test)
    monkeypatch.setitem(emnist.SPLITS, split, spec)
    return spec


def write_emnist(root: Path, spec, extracted: bool = True) -> dict:
    """The split's files in <root>/EMNIST/raw/: the test images extracted, the rest gzipped (both occur)."""
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = emnist_arrays(spec)
    for name, data in emnist_files(spec, arrays).items():
        if extracted and "test-images" in name:
            (raw / name[:-3]).write_bytes(gzip.decompress(data))
        else:
            (raw / name).write_bytes(data)
    return arrays


def write_emnist_zip(path: Path, specs) -> str:
    """NIST's archive: gzip/<file>.gz for every split given; returns its MD5."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for spec in specs:
            for name, data in emnist_files(spec, emnist_arrays(spec)).items():
                zf.writestr(f"gzip/{name}", data)
    return md5(path.read_bytes())


def test_emnist_reads_torchvision_layout_upright(tmp_path, monkeypatch):
    spec = small_emnist(monkeypatch)
    arrays = write_emnist(tmp_path, spec)
    data = load_dataset("emnist-balanced", tmp_path, progress=False)
    assert data.image_shape == (1, 28, 28) and len(data.classes) == 47
    assert data.classes[9:12] == ["9", "A", "B"] and data.classes[-1] == "t"
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(arrays["train"][0]))    # turned upright
    assert torch.equal(data.test_images[:, 0], torch.from_numpy(arrays["test"][0]))
    assert data.test_labels.tolist() == arrays["test"][1].tolist()
    pixels = arrays["train"][0] / 255
    assert data.mean[0] == pytest.approx(pixels.mean(), abs=1e-9)
    assert data.std[0] == pytest.approx(pixels.std(ddof=1), abs=1e-9)


def test_emnist_letters_are_numbered_from_zero(tmp_path, monkeypatch):
    spec = small_emnist(monkeypatch, "letters", 52, 26)
    arrays = write_emnist(tmp_path, spec)
    data = load_dataset("emnist-letters", tmp_path, progress=False)
    assert data.classes == list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert data.train_labels.tolist() == (arrays["train"][1] - 1).tolist() and int(data.train_labels.min()) == 0


def test_emnist_split_is_taken_out_of_the_checked_archive(tmp_path, monkeypatch):
    from trainkit.data import emnist
    spec = small_emnist(monkeypatch, "digits")
    other = small_emnist(monkeypatch, "letters", 26, 26)
    raw = tmp_path / "EMNIST" / "raw"
    digest = write_emnist_zip(raw / "gzip.zip", [spec, other])
    monkeypatch.setattr(emnist, "ARCHIVE", dataclasses.replace(emnist.ARCHIVE, gz_md5=digest))
    data = load_dataset("emnist-digits", tmp_path, progress=False)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(emnist_arrays(spec)["train"][0]))
    # Only the split asked for was extracted, under torchvision's names, and nothing half-written is left.
    assert sorted(p.name for p in raw.iterdir()) == sorted(["gzip.zip", *(spec.stem(p, k) for p in ("train", "test")
                                                                       for k in ("images-idx3", "labels-idx1"))])
    # An archive that is not the published one is refused before anything is taken out of it.
    monkeypatch.setattr(emnist, "ARCHIVE", dataclasses.replace(emnist.ARCHIVE, gz_md5="0" * 32))
    with pytest.raises(TrainkitError, match="gzip.zip has the wrong MD5") as info:
        load_dataset("emnist-letters", tmp_path, progress=False)
    assert "\n" not in str(info.value) and not (raw / other.stem("train", "labels-idx1")).exists()


def test_emnist_downloads_the_archive(tmp_path, monkeypatch):
    from trainkit.data import emnist
    spec = small_emnist(monkeypatch, "mnist")
    served = tmp_path / "mirror"
    digest = write_emnist_zip(served / "gzip.zip", [spec])
    monkeypatch.setattr(emnist, "ARCHIVE", dataclasses.replace(emnist.ARCHIVE, gz_md5=digest))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TRAINKIT_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
        data = load_dataset("emnist-mnist", tmp_path / "data", progress=False)
    finally:
        server.shutdown()
    assert len(data.train_labels) == 30 and (tmp_path / "data" / "EMNIST" / "raw" / "gzip.zip").is_file()


@pytest.mark.parametrize("damage, message", [
    ("labels", "holds labels 0-99; emnist-balanced's are 0-46"),
    ("count", "holds an array of shape (29, 28, 28), expected (30, 28, 28)"),
    ("gzip", "is truncated or corrupt (not a valid gzip file)"),
])
def test_damaged_emnist_files_are_one_line(tmp_path, monkeypatch, damage, message):
    spec = small_emnist(monkeypatch)
    write_emnist(tmp_path, spec)
    raw = tmp_path / "EMNIST" / "raw"
    if damage == "labels":
        (raw / (spec.stem("train", "labels-idx1") + ".gz")).write_bytes(gzip.compress(_idx(np.arange(30) * 99 // 29)))
    elif damage == "count":
        images = emnist_arrays(spec)["train"][0][:29]
        (raw / (spec.stem("train", "images-idx3") + ".gz")).write_bytes(gzip.compress(_idx(images)))
    else:
        path = raw / (spec.stem("train", "images-idx3") + ".gz")
        path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(TrainkitError) as info:
        load_dataset("emnist-balanced", tmp_path, progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_emnist_absent_offline_is_one_line(tmp_path):
    proc = run_cli("train", "--dataset", "emnist-letters", "--data-dir", str(tmp_path), "--epochs", "1",
                   "--out", str(tmp_path / "run"), env={"TRAINKIT_MIRROR": "http://127.0.0.1:9/"})
    assert_one_line_error(proc, "emnist-letters file gzip.zip is missing from", "EMNIST/raw/")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Image folders: colour and size

def test_image_folder_keeps_colour_and_most_common_size(tmp_path):
    root = write_rgb_folder(tmp_path / "rgb", odd=2)
    data = load_dataset(f"imagefolder:{root}", tmp_path)
    assert data.image_shape == (3, 40, 40) and len(data.mean) == 3 and data.classes == ["blue", "green", "red"]
    red = data.train_images[data.train_labels == 2].float()
    assert red[:, 0].max() > 200 and red[:, 1].min() < 60        # the colour is there
    assert load_dataset(f"imagefolder:{root}", tmp_path, channels=1).image_shape == (1, 40, 40)
    assert load_dataset(f"imagefolder:{root}", tmp_path, size=(24, 32)).image_shape == (3, 24, 32)


def test_gray_images_and_gray_palettes_stay_one_channel(tmp_path):
    for label, value in (("a", 30), ("b", 200)):
        (tmp_path / "g" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (36, 36), value + i).save(tmp_path / "g" / label / f"{i}.png")
        Image.new("L", (36, 36), value).convert("P").save(tmp_path / "g" / label / "p.png")
    assert load_dataset(f"imagefolder:{tmp_path / 'g'}", tmp_path).image_shape == (1, 36, 36)


def test_datasets_convert_to_the_asked_channels_and_size(mnist_dir):
    data = load_dataset("mnist", mnist_dir, channels=3, size=(32, 32), progress=False, limit_train=64, limit_test=16)
    assert data.image_shape == (3, 32, 32) and len(data.std) == 3
    assert torch.equal(data.train_images[:, 0], data.train_images[:, 2])      # gray, repeated


@pytest.mark.parametrize("text", ["0", "32x", "axb", "5000", "1x2x3"])
def test_bad_image_sizes_are_one_line(text):
    from trainkit.config import validate
    with pytest.raises(TrainkitError, match="--image-size"):
        validate(TrainConfig(image_size=text))


def test_channels_must_be_1_or_3():
    from trainkit.config import validate
    with pytest.raises(TrainkitError, match="--channels must be one of 1, 3, got 2"):
        validate(TrainConfig(channels=2))


# ---------------------------------------------------------------------------------------------
# Augmentation

def test_augmentation_is_chosen_per_dataset(mnist, tmp_path):
    rgb = load_dataset(f"imagefolder:{write_rgb_folder(tmp_path / 'rgb')}", tmp_path)
    assert augmentation(TrainConfig(), mnist) == "seed" and augmentation(TrainConfig(), rgb) == "flip-crop"
    assert augmentation(TrainConfig(augment="none"), rgb) == "none"
    train, _, _ = make_loaders(TrainConfig(), mnist.limit(64, 16), torch.device("cpu"))
    assert train.augment == SeedAugment()             # MNIST: exactly the seed's (black fill)
    train, _, _ = make_loaders(TrainConfig(augment="seed"), rgb, torch.device("cpu"))
    assert train.augment == SeedAugment(fill_border=True)
    assert isinstance(make_loaders(TrainConfig(), rgb, torch.device("cpu"))[0].augment, FlipCrop)


def test_flip_crop_flips_shifts_and_brings_in_no_new_colour():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = FlipCrop().apply(x, torch.tensor([True, False]), torch.tensor([[0.0, 0.0], [2.0, -1.0]]))
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1, :, 1:, :6], x[1, :, :7, 2:])           # shifted by whole pixels
    for i in range(2):                                                 # the padding mirrors the image
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist())
    flips, shifts = FlipCrop().draw(4000, torch.Generator().manual_seed(0))
    assert 0.45 < flips.float().mean() < 0.55 and set(shifts.unique().tolist()) == set(range(-4, 5))


def test_seed_augmentation_fills_with_a_colour_the_images_have():
    images = torch.full((8, 3, 28, 28), 0.9)
    images[:, :, 10:18, 10:18] = 0.2
    degrees, scales = torch.full((8,), 15.0), torch.ones(8)
    out = SeedAugment(fill_border=True).apply(images, degrees, scales)
    assert (((out - 0.2).abs() < 1e-5) | ((out - 0.9).abs() < 1e-5)).all()    # no black corners
    assert SeedAugment().apply(images, degrees, scales).min() == 0        # black corners, as for MNIST


def test_flip_crop_resumes_mid_epoch_exactly(tmp_path):
    data = load_dataset(f"imagefolder:{write_rgb_folder(tmp_path / 'rgb')}", tmp_path)
    make = lambda: TensorLoader(data.train_images, data.train_labels, 4, mean=data.mean, std=data.std,
                                shuffle=True, augment=FlipCrop(), seed=5)
    full = [x for x, _ in make()]
    loader = make()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    again = make()
    again.load_state_dict(state)
    rest = [x for x, _ in again]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))


@pytest.mark.slow           # importing torchvision's transforms alone takes seconds here
def test_torchvision_pipeline_does_flip_crop_at_the_images_size(tmp_path):
    data = load_dataset(f"imagefolder:{write_rgb_folder(tmp_path / 'rgb')}", tmp_path)
    loader = torchvision_loader(data.train_images, data.train_labels, 4, mean=data.mean, std=data.std,
                                train=True, workers=0, augment="flip-crop")
    x, y = next(iter(loader))
    assert tuple(x.shape) == (4, 3, 40, 40)


# ---------------------------------------------------------------------------------------------
# End to end: zoo models, trained and evaluated again from another folder

def _final_test_acc(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["test_acc"])


def _eval_acc(stdout: str) -> float:
    line = [l for l in stdout.splitlines() if l.startswith("Test set:")][-1]
    return float(line.rsplit("(", 1)[1].rstrip("%)"))


@pytest.mark.slow
def test_timm_resnet18_on_cifar10_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    from trainkit.commands.cli import main
    spec, _ = write_cifar(tmp_path / "data", n_train=64, n_test=32)
    monkeypatch.setitem(cifar.CIFAR_DATASETS, "cifar10", spec)
    run = tmp_path / "runs" / "cifar"
    assert main(["train", "--model", "timm:resnet18", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                 "--epochs", "1", "--batch-size", "16", "--lr", "0.05", "--limit-train", "64",
                 "--limit-test", "32", "--out", str(run), "--no-progress"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert _eval_acc(capsys.readouterr().out) == pytest.approx(_final_test_acc(run), abs=0.01)


@pytest.mark.slow
def test_torchvision_resnet18_on_an_rgb_folder_end_to_end(tmp_path):
    root = write_rgb_folder(tmp_path / "rgb", per_class=12)
    run = tmp_path / "runs" / "rgb"
    cli_ok("train", "--model", "torchvision:resnet18", "--dataset", f"imagefolder:{root}", "--epochs", "1",
           "--batch-size", "8", "--lr", "0.05", "--out", run, "--no-progress", cwd=tmp_path)
    import json
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["image_shape"] == [3, 40, 40]
    (tmp_path / "elsewhere").mkdir()
    proc = cli_ok("eval", run, cwd=tmp_path / "elsewhere")
    assert _eval_acc(proc.stdout) == pytest.approx(_final_test_acc(run), abs=0.01)
    proc = cli_ok("predict", run, root / "red" / "0.png", cwd=tmp_path / "elsewhere")
    assert "red" in proc.stdout


@pytest.mark.slow
def test_s5net_on_colour_images_is_one_line(tmp_path):
    root = write_rgb_folder(tmp_path / "rgb", per_class=3)
    proc = run_cli("train", "--dataset", f"imagefolder:{root}", "--epochs", "1", "--out", tmp_path / "r")
    assert_one_line_error(proc, "needs 28x28 images, these are 40x40")
