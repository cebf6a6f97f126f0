"""MNIST, Fashion-MNIST and KMNIST: four IDX files each, where torchvision puts them
(<data_dir>/<folder>/raw/, extracted or .gz), checked by MD5 and shape, downloaded when absent;
and `idx:DIR`, a user's own four IDX files in the same layout, checked by structure."""
from __future__ import annotations

import gzip
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from . import fetch
from .dataset import ImageData, channel_stats
from .formats import encode_idx, idx_bytes, parse_idx
from .registry import Example, ReadOptions, register_dataset


@dataclass(frozen=True)
class IdxFile:
    stem: str            # e.g. "train-images-idx3-ubyte"
    gz_md5: str          # md5 of the published .gz
    raw_md5: str | None  # md5 of the decompressed bytes (None: unpublished, so only the .gz is read)
    shape: tuple[int, ...]


@dataclass(frozen=True)
class IdxDataset:
    name: str
    folder: str                       # torchvision's folder name: <data_dir>/<folder>/raw/
    mirrors: tuple[str, ...]
    files: dict[str, IdxFile]         # keys: train_images, train_labels, test_images, test_labels
    classes: tuple[str, ...]
    mean: float
    std: float
    system_dirs: tuple[str, ...] = ()  # where a system package puts the files


MNIST = IdxDataset(
    name="mnist",
    folder="MNIST",
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    files={
        "train_images": IdxFile("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                "6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
        "train_labels": IdxFile("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432",
                                "a25bea736e30d166cdddb491f175f624", (60000,)),
        "test_images": IdxFile("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3",
                               "2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c",
                               "27ae3e4e09519cfbb04c329615203637", (10000,)),
    },
    classes=tuple(str(i) for i in range(10)),
    mean=0.1307,
    std=0.3081,
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    folder="FashionMNIST",
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    files={
        "train_images": IdxFile("train-images-idx3-ubyte", "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                "f4a8712d7a061bf5bd6d2ca38dc4d50a", (60000, 28, 28)),
        "train_labels": IdxFile("train-labels-idx1-ubyte", "25c81989df183df01b3e8a0aad5dffbe",
                                "9018921c3c673c538a1fc5bad174d6f9", (60000,)),
        "test_images": IdxFile("t10k-images-idx3-ubyte", "bef4ecab320f06d8554ea6380940ec79",
                               "8181f5470baa50b63fa0f6fddb340f0a", (10000, 28, 28)),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte", "bb300cfdad3c16e7a12a480ee83cd310",
                               "15d484375f8d13e6eb1aabb0c3f46965", (10000,)),
    },
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
             "Bag", "Ankle boot"),
    # Computed over the 60,000 training images.
    mean=0.2860,
    std=0.3530,
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

KMNIST = IdxDataset(
    name="kmnist",
    folder="KMNIST",
    mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
    # torchvision's checksums of the published .gz files; no checksum of the extracted files is
    # published, so only the .gz files are read (torchvision keeps them beside what it extracts).
    files={
        "train_images": IdxFile("train-images-idx3-ubyte", "bdb82020997e1d708af4cf47b453dcf7", None, (60000, 28, 28)),
        "train_labels": IdxFile("train-labels-idx1-ubyte", "e144d726b3acfaa3e44228e80efcd344", None, (60000,)),
        "test_images": IdxFile("t10k-images-idx3-ubyte", "5c965bf0a639b31b8f53240b1b52f4d7", None, (10000, 28, 28)),
        "test_labels": IdxFile("t10k-labels-idx1-ubyte", "7320c461ea6c1c855c0b718fb2a4b134", None, (10000,)),
    },
    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    # The values commonly used for KMNIST's 60,000 training images.
    mean=0.1918,
    std=0.3483,
)

IDX_DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST, KMNIST)}


def idx_size(item: IdxFile) -> int:
    """Bytes of the extracted IDX file: its header (4 + 4 per dimension) and one byte per value."""
    return idx_bytes(item.shape)


def _fix_hint(spec: IdxDataset, path: Path) -> str:
    # The file may be the user's own: point to the route that reads it before advising deletion.
    return (f"it is not the published {spec.name}; to read your own IDX files use --dataset idx:{path.parent} "
            f"(or {spec.name}:{path.parent}, with {spec.name}'s class names); else delete it and run again "
            f"to download a fresh copy")


def read_idx_file(path: Path, spec: IdxDataset, item: IdxFile) -> np.ndarray:
    """Read one .gz or extracted IDX file and check it: size, md5, header and shape."""
    expected = idx_size(item)
    # A .gz is at most a little larger than what it holds (stored blocks); either kind of file
    # larger than that is refused before it is read into memory.
    limit = expected if path.suffix != ".gz" else expected + expected // 100 + (1 << 16)
    data = fetch.read_limited(path, limit, f"; the {spec.name} file holds {expected} bytes of data); "
                              + _fix_hint(spec, path))
    if path.suffix == ".gz":
        # The published .gz, or a repacked one (Debian's) whose content is the original.
        gz_ok = fetch.md5(data) == item.gz_md5
        try:
            data = fetch.gunzip(data, expected)
        except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
            raise TrainkitError(f"{path} is truncated or corrupt (not a valid gzip file); "
                                + _fix_hint(spec, path)) from None
        if len(data) > expected:
            raise TrainkitError(f"{path} is corrupt or not the {spec.name} file: it decompresses to more than "
                                f"the {expected} bytes of {item.stem}; " + _fix_hint(spec, path))
        if not gz_ok and (item.raw_md5 is None or fetch.md5(data) != item.raw_md5):
            raise TrainkitError(f"{path} has the wrong MD5 ({fetch.md5(data)} after decompression; the "
                                f"published file's is {item.gz_md5}); " + _fix_hint(spec, path))
    array = parse_idx(data, str(path))
    if array.shape != item.shape:
        raise TrainkitError(f"{path} holds an array of shape {array.shape}, expected {item.shape}; "
                            + _fix_hint(spec, path))
    if path.suffix != ".gz" and fetch.md5(data) != item.raw_md5:
        raise TrainkitError(f"{path} is corrupt (MD5 {fetch.md5(data)}, expected {item.raw_md5}); "
                            + _fix_hint(spec, path))
    return array


def _candidates(spec: IdxDataset, root: Path, item: IdxFile):
    for folder in (root / spec.folder / "raw", *map(Path, spec.system_dirs)):
        for name in (item.stem, item.stem + ".gz") if item.raw_md5 else (item.stem + ".gz",):
            yield folder / name


def load_idx_dataset(spec: IdxDataset, root: str | Path, download: bool = True, progress: bool = True) -> ImageData:
    root = Path(root)
    arrays = {}
    for key, item in spec.files.items():
        path = fetch.find(_candidates(spec, root, item))
        if path is None:
            if not download:
                raise TrainkitError(f"{spec.name} file {item.stem}{'' if item.raw_md5 else '.gz'} not found in "
                                    f"{root / spec.folder / 'raw'}")
            path = fetch.download(spec.name, spec.mirrors, item.stem + ".gz", item.gz_md5, root / spec.folder / "raw",
                                  progress, holds=spec.folder + "/raw/")
        arrays[key] = read_idx_file(path, spec, item)
    to_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    to_labels = lambda a: torch.from_numpy(a.astype(np.int64))
    return ImageData(spec.name, to_images(arrays["train_images"]), to_labels(arrays["train_labels"]),
                     to_images(arrays["test_images"]), to_labels(arrays["test_labels"]),
                     list(spec.classes), (spec.mean,), (spec.std,),
                     sources={item.stem: (idx_size(item), item.gz_md5) for item in spec.files.values()})


OWN_FILE_BYTES = 1 << 30     # a user's IDX file (or what a .gz holds) larger than this is refused
OWN_FILES = {"train_images": ("train", "images-idx3"), "train_labels": ("train", "labels-idx1"),
             "test_images": ("t10k", "images-idx3"), "test_labels": ("t10k", "labels-idx1")}


def _own_file(folder: Path, prefix: str, kind: str) -> Path:
    # torchvision's names (train-images-idx3-ubyte), Kaggle's (train-images.idx3-ubyte), and an older spelling
    names = [f"{prefix}-{kind}-ubyte", f"{prefix}-{kind.replace('-', '.')}-ubyte", f"{prefix}.{kind}-ubyte"]
    found = fetch.find(folder / n for name in names for n in (name, name + ".gz"))
    if found is None:
        raise TrainkitError(f"{folder} holds no {names[0]} (or .gz): --dataset idx:DIR reads four IDX files, "
                            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                            f"t10k-labels-idx1-ubyte (or Kaggle's train-images.idx3-ubyte...), each extracted or .gz")
    return found


def _own_bytes(path: Path) -> bytes:
    """What a user's IDX file holds: its bytes, decompressed for a .gz."""
    raw = fetch.read_limited(path, OWN_FILE_BYTES, f"); --dataset idx:DIR reads files up to {OWN_FILE_BYTES} bytes")
    if path.suffix == ".gz":
        try:
            raw = fetch.gunzip(raw, OWN_FILE_BYTES)
        except (OSError, EOFError, zlib.error):
            raise TrainkitError(f"{path} is truncated or corrupt (not a valid gzip file)") from None
        if len(raw) > OWN_FILE_BYTES:
            raise TrainkitError(f"{path} decompresses to more than {OWN_FILE_BYTES} bytes")
    return raw


def _check_twin(path: Path, raw: bytes) -> None:
    """The extracted file is read when its .gz is there too; one line when the two differ, so that
    it is never a silent choice between two datasets."""
    twin = path.with_name(path.name + ".gz")
    if path.suffix == ".gz" or not twin.is_file():
        return
    try:
        same, why = _own_bytes(twin) == raw, "hold other data"
    except TrainkitError as exc:
        same, why = False, f"differ (the .gz cannot be read: {' '.join(str(exc).split())[:100]})"
    if not same:
        print(f"trainkit: warning: {path.parent} holds {path.name} and {twin.name}, which {why}: read "
              f"{path.name} (the extracted file is read when both are there); remove the one you do not mean",
              file=sys.stderr, flush=True)


def load_own_idx(folder: Path) -> ImageData:
    """A user's four IDX files (`--dataset idx:DIR`): MNIST's layout, any image size and count,
    checked by structure (uint8 images (N, H, W), N labels, as many as the images). The classes are
    the labels 0 to the largest; mean and std are the data's own. Where a file is there both
    extracted and .gz, the extracted one is read (and a warning says so when they differ)."""
    if not folder.is_dir():
        raise TrainkitError(f"--dataset idx:{folder}: no such folder")
    arrays, sources = {}, {}
    for key, (prefix, kind) in OWN_FILES.items():
        path = _own_file(folder, prefix, kind)
        raw = _own_bytes(path)
        _check_twin(path, raw)
        arrays[key] = parse_idx(raw, str(path))
        sources[path.name] = (len(raw), fetch.md5(raw))
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or not len(labels):
            raise TrainkitError(f"{folder}: the {part} files hold images of shape {images.shape} and labels of shape "
                                f"{labels.shape}; idx:DIR needs (N, H, W) images and N labels, N > 0")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise TrainkitError(f"{folder}: the training images are {arrays['train_images'].shape[1:]}, the test images "
                            f"{arrays['test_images'].shape[1:]}; both must have one size")
    classes = _inferred_classes(folder, arrays["train_labels"], arrays["test_labels"])
    to_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)
    to_labels = lambda a: torch.from_numpy(a.astype(np.int64))
    train = to_images(arrays["train_images"])
    mean, std = channel_stats(train)
    return ImageData(f"idx:{folder}", train, to_labels(arrays["train_labels"]), to_images(arrays["test_images"]),
                     to_labels(arrays["test_labels"]), classes, mean, std, sources=sources)


def _inferred_classes(folder: Path, train: np.ndarray, test: np.ndarray) -> list[str]:
    """The classes of idx:DIR, the labels 0 to the largest; refused when most of them would have no
    image (a stray label 255 among digits would make 256 classes, 245 of them empty)."""
    labels = np.concatenate([train, test])
    largest, present = int(labels.max()), np.unique(labels)
    if 2 * len(present) < largest + 1:
        top = present[-3:][::-1].tolist()
        raise TrainkitError(f"{folder}'s labels run 0-{largest}, but only {len(present)} of those {largest + 1} classes "
                            f"have an image (the largest labels: {', '.join(map(str, top))}, "
                            f"{int((labels == largest).sum())} image(s) of {largest}); idx:DIR takes the classes to be 0 "
                            f"to the largest label: correct the stray labels, or number the classes from 0 without gaps")
    return [str(i) for i in range(largest + 1)]


def write_own_idx(folder: Path, train: int = 24, test: int = 12, size: tuple[int, int] = (28, 28)) -> Path:
    """Four IDX files of noise in MNIST's layout (the training ones .gz), 3 classes: what idx:DIR reads."""
    rng = np.random.default_rng(4)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": rng.integers(0, 256, (train, *size)), "train_labels": np.arange(train) % 3,
              "test_images": rng.integers(0, 256, (test, *size)), "test_labels": np.arange(test) % 3}
    for key, (prefix, kind) in OWN_FILES.items():
        data = encode_idx(arrays[key])
        name = f"{prefix}-{kind}-ubyte"
        if prefix == "train":
            (folder / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / name).write_bytes(data)
    return folder


@register_dataset("idx", example=lambda folder: Example(f"idx:{write_own_idx(folder / 'own')}", folder, (1, 28, 28)),
                  arg_is_path=True)
def own_idx(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset idx needs the folder of your IDX files: idx:DIR")
    return load_own_idx(Path(arg))


def _example(name: str):
    def example(folder: Path) -> Example:
        """24 training and 12 test images of noise as .gz IDX files, and the spec with their MD5s."""
        spec, rng = IDX_DATASETS[name], np.random.default_rng(1)
        raw = folder / spec.folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        arrays = {"train_images": rng.integers(0, 256, (24, 28, 28)), "train_labels": np.arange(24) % 10,
                  "test_images": rng.integers(0, 256, (12, 28, 28)), "test_labels": np.arange(12) % 10}
        files = {}
        for key, item in spec.files.items():
            data = gzip.compress(encode_idx(arrays[key]), mtime=0)
            (raw / (item.stem + ".gz")).write_bytes(data)
            files[key] = IdxFile(item.stem, fetch.md5(data), None, arrays[key].shape)
        small = replace(spec, files=files, system_dirs=())
        return Example(name, folder, (1, 28, 28), swap=((IDX_DATASETS, name, small),))
    return example


def load_own_as(spec: IdxDataset, folder: Path) -> ImageData:
    """`--dataset mnist:DIR` (fashion-mnist:DIR, kmnist:DIR): the four IDX files in DIR, read as
    idx:DIR reads them, named with the set's classes; never the published files instead."""
    if not folder.is_dir():
        raise TrainkitError(f"--dataset {spec.name}:{folder}: no such folder")
    if not any(folder.glob("*-ubyte*")) and (folder / spec.folder / "raw").is_dir():
        raise TrainkitError(f"--dataset {spec.name}:{folder} reads your own IDX files in {folder}, which holds none; "
                            f"for the published {spec.name} in {folder / spec.folder / 'raw'} use --dataset "
                            f"{spec.name} --data-dir {folder}")
    data = load_own_idx(folder)
    if len(data.classes) > len(spec.classes):
        raise TrainkitError(f"{folder} holds labels 0-{len(data.classes) - 1}, more than {spec.name}'s "
                            f"{len(spec.classes)} classes; use --dataset idx:{folder}")
    return replace(data, name=f"{spec.name}:{folder}", classes=list(spec.classes))


def _register(name: str) -> None:
    @register_dataset(name, example=_example(name), arg_is_path=True)
    def load(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
        if arg:
            return load_own_as(IDX_DATASETS[name], Path(arg))
        # looked up when called: the registry test swaps in a spec for its own small files
        return load_idx_dataset(IDX_DATASETS[name], data_dir, progress=options.progress)


for _name in IDX_DATASETS:
    _register(_name)
