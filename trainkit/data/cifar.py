"""CIFAR-10 / CIFAR-100: the "python version" that torchvision downloads
(<data_dir>/cifar-10-batches-py/, <data_dir>/cifar-100-python/), checked by MD5 before it is
unpickled (formats.unpickle_cifar builds only numpy arrays), downloaded when absent; and a user's
own files in that format (`cifar10:DIR`, `cifar100:DIR`), checked by their structure."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from . import fetch
from .dataset import ImageData, channel_stats
from .formats import cifar_arrays, cifar_class_names, unpickle_cifar
from .registry import Example, ReadOptions, register_dataset


@dataclass(frozen=True)
class CifarFile:
    name: str      # in <data_dir>/<folder>/
    md5: str
    count: int     # images in it (0 for the meta file)


@dataclass(frozen=True)
class Archive:
    stem: str      # the published file's name, without .gz
    gz_md5: str


@dataclass(frozen=True)
class CifarDataset:
    name: str
    folder: str                      # torchvision's folder name, as the archive holds it
    mirrors: tuple[str, ...]
    archive: Archive                 # the published .tar.gz: its stem and MD5
    train: tuple[CifarFile, ...]
    test: tuple[CifarFile, ...]
    meta: CifarFile
    label_key: str                   # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    names_key: str                   # the class names' key in the meta file
    mean: tuple[float, ...]
    std: tuple[float, ...]


_KRIZ = ("https://www.cs.toronto.edu/~kriz/",)

# torchvision's checksums of the published archives and of the files in them.
CIFAR10 = CifarDataset(
    name="cifar10", folder="cifar-10-batches-py", mirrors=_KRIZ,
    archive=Archive("cifar-10-python.tar", "c58f30108f718f92721af3b95e74349a"),
    train=(CifarFile("data_batch_1", "c99cafc152244af753f735de768cd75f", 10000),
           CifarFile("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec", 10000),
           CifarFile("data_batch_3", "54ebc095f3ab1f0389bbae665268c751", 10000),
           CifarFile("data_batch_4", "634d18415352ddfa80567beed471001a", 10000),
           CifarFile("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb", 10000)),
    test=(CifarFile("test_batch", "40351d587109b95175f43aff81a1287e", 10000),),
    meta=CifarFile("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", 0),
    label_key="labels", names_key="label_names",
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),   # the usual values, per channel
)

CIFAR100 = CifarDataset(
    name="cifar100", folder="cifar-100-python", mirrors=_KRIZ,
    archive=Archive("cifar-100-python.tar", "eb9058c3a382ffc7106e4002c42a8d85"),
    train=(CifarFile("train", "16019d7e3df5f24257cddd939b257f8d", 50000),),
    test=(CifarFile("test", "f0ef6b0ae62326f3e7ffdfab6717acfc", 10000),),
    meta=CifarFile("meta", "7973b15100ade9c7d40fb424638fde48", 0),
    label_key="fine_labels", names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)

CIFAR_DATASETS = {d.name: d for d in (CIFAR10, CIFAR100)}


def _cifar_hint(spec: CifarDataset, path: Path) -> str:
    # The files may be the user's own: never advise deleting them.
    return (f"it is not the published {spec.name}; to read your own files in CIFAR's format, use "
            f"--dataset {spec.name}:{path.parent}")


OWN_FILE_BYTES = 1 << 30     # a user's CIFAR-format file larger than this is refused before it is read


def read_cifar_file(path: Path, spec: CifarDataset, item: CifarFile) -> dict:
    """One CIFAR pickle, MD5-checked before it is unpickled: a dict with str keys."""
    limit = max(item.count, 1) * 3072 * 2 + (1 << 20)   # 3,072 bytes an image, plus names
    raw = fetch.read_limited(path, limit, f") for {item.count} {spec.name} images; " + _cifar_hint(spec, path))
    if fetch.md5(raw) != item.md5:
        raise TrainkitError(f"{path} is corrupt (MD5 {fetch.md5(raw)}, expected {item.md5}); " + _cifar_hint(spec, path))
    return unpickle_cifar(raw, str(path), f"a {spec.name} file", _cifar_hint(spec, path))


def _cifar_batch(path: Path, spec: CifarDataset, item: CifarFile) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one batch file, shapes and labels checked."""
    return cifar_arrays(read_cifar_file(path, spec, item), spec.label_key, item.count, str(path),
                        _cifar_hint(spec, path))


def load_cifar(spec: CifarDataset, root: str | Path, download: bool = True, progress: bool = True) -> ImageData:
    root = Path(root)
    folder = root / spec.folder
    files = (*spec.train, *spec.test, spec.meta)
    if not all((folder / f.name).is_file() for f in files):
        if folder.exists() or not download:
            missing = [f.name for f in files if not (folder / f.name).is_file()]
            raise TrainkitError(f"{spec.name} file {missing[0]} not found in {folder}; to read your own files in "
                                f"CIFAR's format use --dataset {spec.name}:{folder}, or point --data-dir at a folder "
                                f"holding the published {spec.folder}/ (or none, to download it)")
        archive = fetch.download(spec.name, spec.mirrors, spec.archive.stem + ".gz", spec.archive.gz_md5, root,
                                 progress, holds=f"{spec.folder}/")
        fetch.extract_tar(archive, {f"{spec.folder}/{f.name}" for f in files}, folder)
    train = [_cifar_batch(folder / f.name, spec, f) for f in spec.train]
    test = [_cifar_batch(folder / f.name, spec, f) for f in spec.test]
    meta = folder / spec.meta.name
    classes = cifar_class_names(read_cifar_file(meta, spec, spec.meta), spec.names_key, str(meta),
                                _cifar_hint(spec, meta))
    labels = torch.cat([y for _, y in train + test])
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise TrainkitError(f"{folder} holds labels outside the {len(classes)} classes of {spec.meta.name}; "
                            + _cifar_hint(spec, meta))
    return ImageData(spec.name, torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
                     torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]), classes, spec.mean, spec.std,
                     sources={f.name: (f.count, f.md5) for f in files})


def _own_files(spec: CifarDataset, folder: Path) -> tuple[list[Path], Path, Path]:
    """(training batches, test batch, meta file) of a folder in CIFAR's layout: CIFAR-10's
    data_batch_N (any number), test_batch and batches.meta; CIFAR-100's train, test and meta."""
    if spec.label_key == "labels":
        numbered = [p for p in folder.glob("data_batch_*") if p.name[len("data_batch_"):].isdigit()]
        train = sorted(numbered, key=lambda p: int(p.name[len("data_batch_"):]))
    else:
        train = [folder / f.name for f in spec.train if (folder / f.name).is_file()]
    test, meta = folder / spec.test[0].name, folder / spec.meta.name
    missing = [p.name for p in (test, meta) if not p.is_file()] + ([] if train else [f"{spec.train[0].name}"])
    if missing:
        raise TrainkitError(f"{folder} holds no {missing[0]}: --dataset {spec.name}:DIR reads "
                            f"{'data_batch_1, 2... ' if spec.label_key == 'labels' else 'train, '}"
                            f"{spec.test[0].name} and {spec.meta.name} in CIFAR's python format")
    return train, test, meta


def load_own_cifar(spec: CifarDataset, folder: Path) -> ImageData:
    """A user's files in CIFAR's format (`--dataset cifar10:DIR`): not the published ones, so no
    MD5 to check; checked by structure instead (the keys, (N, 3072) uint8 images, N int labels
    within the classes of the meta file), unpickled by the same unpickler. Mean and std are the
    data's own; DIR may also be the folder that holds `cifar-10-batches-py/`."""
    folder = folder / spec.folder if (folder / spec.folder).is_dir() else folder
    if not folder.is_dir():
        raise TrainkitError(f"--dataset {spec.name}:{folder}: no such folder")
    train_paths, test_path, meta_path = _own_files(spec, folder)
    hint = (f"--dataset {spec.name}:DIR reads pickled dicts with 'data' ((N, 3072) or (N, 3, 32, 32) uint8) and "
            f"'{spec.label_key}' (N ints), and '{spec.names_key}' in {spec.meta.name}")
    sources = {}

    def read(path: Path) -> dict:
        raw = fetch.read_limited(path, OWN_FILE_BYTES, f"); {hint}")
        sources[path.name] = (len(raw), fetch.md5(raw))
        return unpickle_cifar(raw, str(path), "a file in CIFAR's format", hint)

    train = [cifar_arrays(read(p), spec.label_key, None, str(p), hint) for p in train_paths]
    test_x, test_y = cifar_arrays(read(test_path), spec.label_key, None, str(test_path), hint)
    classes = cifar_class_names(read(meta_path), spec.names_key, str(meta_path), hint)
    train_x, train_y = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    for what, labels in (("training", train_y), ("test", test_y)):
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
            raise TrainkitError(f"{folder}'s {what} labels run {int(labels.min())}-{int(labels.max())}, outside the "
                                f"{len(classes)} classes of {meta_path.name}")
    if not len(train_y) or not len(test_y):
        raise TrainkitError(f"{folder} holds no {'training' if not len(train_y) else 'test'} images")
    print(_what_was_read(spec, folder, train_paths, test_path, len(train_y), len(test_y)), flush=True)
    mean, std = channel_stats(train_x)
    return ImageData(f"{spec.name}:{folder}", train_x, train_y, test_x, test_y, classes, mean, std, sources=sources)


def _what_was_read(spec: CifarDataset, folder: Path, train: list[Path], test: Path, n_train: int, n_test: int) -> str:
    """One line: the files read, their images, and the numbered batches missing among them
    ("cifar10:DIR: read data_batch_1,2,3,5 and test_batch (40,000 + 10,000 images); data_batch_4 absent")."""
    numbers = [int(p.name[len("data_batch_"):]) for p in train if p.name.startswith("data_batch_")]
    if spec.label_key == "labels" and numbers:
        read = "data_batch_" + ",".join(map(str, numbers))
        gaps = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
    else:
        read, gaps = ", ".join(p.name for p in train), []
    absent = "; " + ", ".join(f"data_batch_{n}" for n in gaps) + " absent" if gaps else ""
    return f"{spec.name}:{folder}: read {read} and {test.name} ({n_train:,} + {n_test:,} images){absent}"


def write_cifar_files(folder: Path, spec: CifarDataset, n_train: int, n_test: int, seed: int = 0) -> CifarDataset:
    """Small files in the CIFAR format, pickled as the published ones are (protocol 2, bytes
    keys), images whose colour says their class; returns `spec` with these files' names and MD5s."""
    rng, classes = np.random.default_rng(seed), 10 if spec.label_key == "labels" else 100
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, content: dict, count: int) -> CifarFile:
        raw = pickle.dumps(content, protocol=2)
        (folder / name).write_bytes(raw)
        return CifarFile(name, fetch.md5(raw), count)

    def batch(name: str, n: int) -> CifarFile:
        labels = np.arange(n) % classes
        images = np.clip((labels * 25 % 256)[:, None] + rng.integers(-20, 21, (n, 3072)), 0, 255).astype(np.uint8)
        return write(name, {b"data": images, spec.label_key.encode(): labels.tolist()}, n)

    meta = write(spec.meta.name, {spec.names_key.encode(): [f"class{i}".encode() for i in range(classes)]}, 0)
    return replace(spec, train=(batch(spec.train[0].name, n_train),), test=(batch(spec.test[0].name, n_test),),
                   meta=meta)


def _register(name: str) -> None:
    def example(folder: Path) -> Example:
        small = write_cifar_files(folder / CIFAR_DATASETS[name].folder, CIFAR_DATASETS[name], 16, 8)
        return Example(name, folder, (3, 32, 32), swap=((CIFAR_DATASETS, name, small),))

    @register_dataset(name, example=example, arg_is_path=True)
    def load(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
        if arg:                        # name:DIR, the user's own files in CIFAR's format
            return load_own_cifar(CIFAR_DATASETS[name], Path(arg))
        return load_cifar(CIFAR_DATASETS[name], data_dir, progress=options.progress)


for _name in CIFAR_DATASETS:
    _register(_name)
