"""Image datasets read once into uint8 tensors: MNIST, Fashion-MNIST, KMNIST, CIFAR-10/100 and
image folders (EMNIST: emnist.py).

Nothing is ever written into a data folder that already holds the files, so a read-only
folder works. Every file is checked before it is used; a bad one is a TrainkitError that
names the file and says how to fix it.
"""
from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import http.client
import io
import inspect
import math
import os
import pickle
import shutil
import signal
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import TrainkitError
from .registry import Registry


@dataclass
class ImageData:
    """A dataset held in memory: images are (N, C, H, W) uint8, labels (N,) int64."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_images: torch.Tensor | None = None   # a validation split held out of the training images
    val_labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @classmethod
    def from_datasets(cls, train, test, classes: list[str], mean=None, std=None, name: str = "custom") -> "ImageData":
        """Any two torch Datasets of (image, label) pairs, images as PIL images or (C, H, W)
        tensors (uint8, or float in [0, 1]). Mean and std are computed when not given."""
        def stack(dataset):
            images, labels = [], []
            for image, label in dataset:
                if not isinstance(image, torch.Tensor):
                    image = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
                    image = image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)
                if image.is_floating_point():
                    image = (image * 255).round().clamp(0, 255)
                images.append(image.to(torch.uint8))
                labels.append(int(label))
            return torch.stack(images), torch.tensor(labels, dtype=torch.int64)

        train_x, train_y = stack(train)
        test_x, test_y = stack(test)
        if mean is None or std is None:
            mean, std = channel_stats(train_x)
        return cls(name, train_x, train_y, test_x, test_y, list(classes), tuple(mean), tuple(std))

    def limit(self, train: int | None = None, test: int | None = None) -> "ImageData":
        """The first `train` training and `test` test images (for quick runs)."""
        return ImageData(self.name, self.train_images[:train], self.train_labels[:train],
                         self.test_images[:test], self.test_labels[:test],
                         self.classes, self.mean, self.std, self.val_images, self.val_labels)

    def split_validation(self, size: float, seed: int = 0) -> "ImageData":
        """Hold `size` training images out for validation: a fraction (0 < size < 1) or a count,
        chosen at random with a fixed seed, so the same run always holds out the same images."""
        n = len(self.train_labels)
        count = int(round(size * n)) if size < 1 else int(size)
        if not 0 < count < n:
            raise TrainkitError(f"--val-split {size} leaves {n - count} of {n} training images; "
                                f"give a fraction between 0 and 1 or a count below {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, train = order[:count].sort().values, order[count:].sort().values
        return ImageData(self.name, self.train_images[train], self.train_labels[train], self.test_images,
                         self.test_labels, self.classes, self.mean, self.std,
                         self.train_images[val], self.train_labels[val])


# ---------------------------------------------------------------------------------------------
# IDX files (the format of MNIST and Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Decode an IDX byte string; a wrong header or size raises TrainkitError."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise TrainkitError(f"{name} is not an IDX file (bad header)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TrainkitError(f"{name} is truncated (header cut short)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long"
        raise TrainkitError(f"{name} is {what}: {len(raw)} bytes, its header says {expected}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(dims)


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


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _fix_hint(spec: IdxDataset, path: Path) -> str:
    return (f"delete it and run again to download a fresh copy, or put a good copy of the "
            f"{spec.name} files in {path.parent}")


def idx_size(item: IdxFile) -> int:
    """Bytes of the extracted IDX file: its header (4 + 4 per dimension) and one byte per value."""
    return 4 + 4 * len(item.shape) + math.prod(item.shape)


def _gunzip(data: bytes, limit: int) -> bytes:
    """Decompress at most `limit + 1` bytes: a file that expands further is not the one expected,
    and this finds out without allocating what a gzip bomb expands to."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        return f.read(limit + 1)


def read_idx_file(path: Path, spec: IdxDataset, item: IdxFile) -> np.ndarray:
    """Read one .gz or extracted IDX file and check it: size, md5, header and shape."""
    expected = idx_size(item)
    # A .gz is at most a little larger than what it holds (stored blocks); either kind of file
    # larger than that is refused before it is read into memory.
    limit = expected if path.suffix != ".gz" else expected + expected // 100 + (1 << 16)
    try:
        size = path.stat().st_size
        if size > limit:
            raise TrainkitError(f"{path} is too large ({size} bytes; the {spec.name} file holds {expected} "
                                f"bytes of data); " + _fix_hint(spec, path))
        data = path.read_bytes()
    except OSError as exc:
        raise TrainkitError(f"cannot read {path}: {exc.strerror}") from None
    if path.suffix == ".gz":
        # The published .gz, or a repacked one (Debian's) whose content is the original.
        gz_ok = _md5(data) == item.gz_md5
        try:
            data = _gunzip(data, expected)
        except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
            raise TrainkitError(f"{path} is truncated or corrupt (not a valid gzip file); "
                                + _fix_hint(spec, path)) from None
        if len(data) > expected:
            raise TrainkitError(f"{path} is corrupt or not the {spec.name} file: it decompresses to more than "
                                f"the {expected} bytes of {item.stem}; " + _fix_hint(spec, path))
        if not gz_ok and (item.raw_md5 is None or _md5(data) != item.raw_md5):
            raise TrainkitError(f"{path} has the wrong MD5 ({_md5(data)} after decompression; the "
                                f"published file's is {item.gz_md5}); " + _fix_hint(spec, path))
    array = parse_idx(data, str(path))
    if array.shape != item.shape:
        raise TrainkitError(f"{path} holds an array of shape {array.shape}, expected {item.shape}; "
                            + _fix_hint(spec, path))
    if path.suffix != ".gz" and _md5(data) != item.raw_md5:
        raise TrainkitError(f"{path} is corrupt (MD5 {_md5(data)}, expected {item.raw_md5}); "
                            + _fix_hint(spec, path))
    return array


def _find(spec: IdxDataset, root: Path, item: IdxFile) -> Path | None:
    for folder in (root / spec.folder / "raw", *map(Path, spec.system_dirs)):
        for name in (item.stem, item.stem + ".gz") if item.raw_md5 else (item.stem + ".gz",):
            if (folder / name).is_file():
                return folder / name
    return None


def _mirrors(spec: IdxDataset) -> tuple[str, ...]:
    override = os.environ.get("TRAINKIT_MIRROR")  # a local mirror, for offline sites and tests
    return (override.rstrip("/") + "/",) if override else spec.mirrors


DOWNLOAD_TIMEOUT = 120.0   # seconds for one file, all mirrors together ($TRAINKIT_DOWNLOAD_TIMEOUT)
SOCKET_TIMEOUT = 20.0      # seconds one connect or read may block


def download_timeout() -> float:
    text = os.environ.get("TRAINKIT_DOWNLOAD_TIMEOUT", "").strip()
    if not text:
        return DOWNLOAD_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise TrainkitError(f"TRAINKIT_DOWNLOAD_TIMEOUT must be a number of seconds greater than 0, "
                            f"got {text[:80]!r}")
    return seconds


class _Fetch(threading.Thread):
    """Copies a URL into an open file, in a thread of its own: a mirror that sends a byte every
    few seconds never trips a socket timeout, so the caller watches the deadline from outside,
    and stays free to react to a signal at once."""

    def __init__(self, url: str, out, timeout: float):
        super().__init__(daemon=True)
        self.url, self.out, self.timeout = url, out, timeout
        self.received, self.total, self.error = 0, None, None
        self.started = self.cancelled = False

    def run(self) -> None:
        try:
            with self.out, urllib.request.urlopen(self.url, timeout=self.timeout) as response:
                self.total = int(response.headers.get("Content-Length") or 0) or None
                self.started = True
                # read1 returns what has arrived; read(n) would wait for all n bytes.
                while not self.cancelled and (chunk := response.read1(1 << 16)):
                    self.out.write(chunk)
                    self.received += len(chunk)
        except BaseException as exc:  # handed to the caller: a thread must not print a traceback
            self.error = exc


class _DeadlinePassed(Exception):
    pass


def _fetch(url: str, out, deadline: float, make_bar) -> None:
    """Download `url` into `out` (which this closes), or raise _DeadlinePassed at `deadline`.
    `make_bar(total)` makes the progress bar, once the mirror has answered."""
    fetch = _Fetch(url, out, timeout=max(0.1, min(SOCKET_TIMEOUT, deadline - time.monotonic())))
    fetch.start()
    bar = None
    try:
        while True:
            fetch.join(0.1)
            if fetch.started:
                if bar is None:
                    bar = make_bar(fetch.total)
                bar.update(fetch.received - bar.n)
            if not fetch.is_alive():
                break
            if time.monotonic() > deadline:
                raise _DeadlinePassed(f"{fetch.received} of {fetch.total or 'unknown'} bytes received")
    finally:
        fetch.cancelled = True  # it stops at its next read; the file it writes is deleted by the caller
        if bar is not None:
            bar.close()
    if fetch.error is not None:
        raise fetch.error


@contextlib.contextmanager
def _signals_stop(what: str):
    """SIGINT / SIGTERM stop a download at once, as a TrainkitError with exit code 128 + signal.

    While training, these signals only set a flag that is checked between steps, which a
    download would not reach for minutes. The handlers in place are put back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def stop(signum, frame):
        restore()  # a second signal goes where it went before
        raise TrainkitError(f"stopped by {signal.Signals(signum).name} while {what}; nothing was kept",
                            exit_code=128 + signum)

    for s in signums:
        signal.signal(s, stop)
    try:
        yield
    finally:
        restore()


def download_file(spec: IdxDataset, item: IdxFile, dest_dir: Path, progress: bool = True,
                  filename: str | None = None, file_md5=None) -> Path:
    """Download one file (`filename`, by default the item's .gz) from the dataset's mirrors, check
    its MD5 (`file_md5(path)`, by default read whole), then move it into place.

    Every mirror together gets download_timeout() seconds; SIGINT / SIGTERM stop it at once.
    Only a complete, checked file ever appears under the final name.
    """
    from tqdm.auto import tqdm

    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainkitError(f"cannot create {dest_dir} to download {spec.name} into: {exc.strerror}") from None
    dest = dest_dir / (filename or item.stem + ".gz")
    timeout = download_timeout()
    deadline = time.monotonic() + timeout
    errors = []
    with _signals_stop(f"downloading {dest}"):
        for mirror in _mirrors(spec):
            url = mirror + dest.name
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
                _fetch(url, os.fdopen(fd, "wb"), deadline,
                       lambda total: tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress))
                if (file_md5 or (lambda path: _md5(path.read_bytes())))(Path(tmp)) != item.gz_md5:
                    errors.append(f"{url}: wrong MD5")
                    continue
                os.replace(tmp, dest)  # only a checked file ever gets the final name
                return dest
            except _DeadlinePassed as exc:
                errors.append(f"{url}: not done within {timeout:g} s, {exc}; TRAINKIT_DOWNLOAD_TIMEOUT "
                              f"sets the time allowed")
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', None) or exc or type(exc).__name__}")
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
    raise TrainkitError(f"{spec.name} file {dest.name} is missing from {dest_dir} and could not be "
                        f"downloaded ({'; '.join(errors)}); copy the files there, or point --data-dir "
                        f"(or TRAINKIT_DATA_DIR) at a folder holding {getattr(spec, 'holds', spec.folder + '/raw/')}")


def load_idx_dataset(spec: IdxDataset, root: str | Path, download: bool = True, progress: bool = True) -> ImageData:
    root = Path(root)
    arrays = {}
    for key, item in spec.files.items():
        path = _find(spec, root, item)
        if path is None:
            if not download:
                raise TrainkitError(f"{spec.name} file {item.stem}{'' if item.raw_md5 else '.gz'} not found in "
                                    f"{root / spec.folder / 'raw'}")
            path = download_file(spec, item, root / spec.folder / "raw", progress)
        arrays[key] = read_idx_file(path, spec, item)
    to_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    to_labels = lambda a: torch.from_numpy(a.astype(np.int64))
    return ImageData(spec.name, to_images(arrays["train_images"]), to_labels(arrays["train_labels"]),
                     to_images(arrays["test_images"]), to_labels(arrays["test_labels"]),
                     list(spec.classes), (spec.mean,), (spec.std,))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: the "python version" that torchvision downloads (<data_dir>/cifar-10-batches-py/),
# checked by MD5 before it is read, and unpickled by an unpickler that builds only numpy arrays.

@dataclass(frozen=True)
class CifarFile:
    name: str      # in <data_dir>/<folder>/
    md5: str
    count: int     # images in it (0 for the meta file)


@dataclass(frozen=True)
class CifarDataset:
    name: str
    folder: str                      # torchvision's folder name, as the archive holds it
    mirrors: tuple[str, ...]
    archive: IdxFile                 # the published .tar.gz: its stem and MD5
    train: tuple[CifarFile, ...]
    test: tuple[CifarFile, ...]
    meta: CifarFile
    label_key: str                   # "labels" (CIFAR-10) or "fine_labels" (CIFAR-100)
    names_key: str                   # the class names' key in the meta file
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def holds(self) -> str:          # for download_file's message
        return f"{self.folder}/"


_KRIZ = ("https://www.cs.toronto.edu/~kriz/",)

# torchvision's checksums of the published archives and of the files in them.
CIFAR10 = CifarDataset(
    name="cifar10", folder="cifar-10-batches-py", mirrors=_KRIZ,
    archive=IdxFile("cifar-10-python.tar", "c58f30108f718f92721af3b95e74349a", None, ()),
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
    archive=IdxFile("cifar-100-python.tar", "eb9058c3a382ffc7106e4002c42a8d85", None, ()),
    train=(CifarFile("train", "16019d7e3df5f24257cddd939b257f8d", 50000),),
    test=(CifarFile("test", "f0ef6b0ae62326f3e7ffdfab6717acfc", 10000),),
    meta=CifarFile("meta", "7973b15100ade9c7d40fb424638fde48", 0),
    label_key="fine_labels", names_key="fine_label_names",
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)

CIFAR_DATASETS = {d.name: d for d in (CIFAR10, CIFAR100)}

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]   # numpy's own array rebuilder, under any numpy version


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, numbers and numpy arrays; any other class is refused, so a
    hostile pickle cannot run code."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _RECONSTRUCT
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":   # how Python 3's protocol 2 writes bytes
            return codecs.encode
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")


def _cifar_hint(spec: CifarDataset, path: Path) -> str:
    return (f"delete {spec.folder} and run again to download a fresh copy, or put a good copy of "
            f"torchvision's {spec.folder} folder in {path.parent.parent}")


def read_cifar_file(path: Path, spec: CifarDataset, item: CifarFile) -> dict:
    """One CIFAR pickle, MD5-checked before it is unpickled: a dict with str keys."""
    try:
        size = path.stat().st_size
        if size > max(item.count, 1) * 3072 * 2 + (1 << 20):   # 3,072 bytes an image, plus names
            raise TrainkitError(f"{path} is too large ({size} bytes) for {item.count} {spec.name} images; "
                                + _cifar_hint(spec, path))
        raw = path.read_bytes()
    except OSError as exc:
        raise TrainkitError(f"cannot read {path}: {exc.strerror}") from None
    if _md5(raw) != item.md5:
        raise TrainkitError(f"{path} is corrupt (MD5 {_md5(raw)}, expected {item.md5}); " + _cifar_hint(spec, path))
    try:
        # The published files were pickled by Python 2: their strings are bytes.
        content = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}
    except Exception as exc:  # unpickling fails in many ways; none may become a traceback
        raise TrainkitError(f"{path} is not a {spec.name} file ({type(exc).__name__}); "
                            + _cifar_hint(spec, path)) from None


def _cifar_batch(path: Path, spec: CifarDataset, item: CifarFile) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one batch file, shapes and labels checked."""
    content = read_cifar_file(path, spec, item)
    data, labels = content.get("data"), content.get(spec.label_key)
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (item.count, 3072) \
        and isinstance(labels, list) and len(labels) == item.count and all(isinstance(v, int) for v in labels)
    if not ok:
        raise TrainkitError(f"{path} does not hold {item.count} images of 3x32x32 with their "
                            f"{spec.label_key}; " + _cifar_hint(spec, path))
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(labels, dtype=torch.int64)


def _extract_cifar(spec: CifarDataset, archive: Path, root: Path) -> None:
    """Take the expected files out of the checked archive (nothing else: no links, no other
    paths), into a temporary folder renamed into place once complete."""
    wanted = {f"{spec.folder}/{f.name}" for f in (*spec.train, *spec.test, spec.meta)}
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        os.replace(tmp, root / spec.folder)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        raise TrainkitError(f"could not extract {archive} into {root / spec.folder}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cifar(spec: CifarDataset, root: str | Path, download: bool = True, progress: bool = True) -> ImageData:
    root = Path(root)
    folder = root / spec.folder
    files = (*spec.train, *spec.test, spec.meta)
    if not all((folder / f.name).is_file() for f in files):
        if folder.exists() or not download:
            missing = [f.name for f in files if not (folder / f.name).is_file()]
            raise TrainkitError(f"{spec.name} file {missing[0]} not found in {folder}; delete the folder to "
                                f"download it again, or point --data-dir at a folder holding {spec.folder}/")
        archive = download_file(spec, spec.archive, root, progress)
        _extract_cifar(spec, archive, root)
    train = [_cifar_batch(folder / f.name, spec, f) for f in spec.train]
    test = [_cifar_batch(folder / f.name, spec, f) for f in spec.test]
    names = read_cifar_file(folder / spec.meta.name, spec, spec.meta).get(spec.names_key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise TrainkitError(f"{folder / spec.meta.name} holds no list {spec.names_key}; "
                            + _cifar_hint(spec, folder / spec.meta.name))
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    labels = torch.cat([y for _, y in train + test])
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise TrainkitError(f"{folder} holds labels outside the {len(classes)} classes of {spec.meta.name}; "
                            + _cifar_hint(spec, folder / spec.meta.name))
    return ImageData(spec.name, torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
                     torch.cat([x for x, _ in test]), torch.cat([y for _, y in test]), classes, spec.mean, spec.std)


# ---------------------------------------------------------------------------------------------
# Image folders: one subfolder per class, PNG or JPEG files of any size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _open_image(path, name=None):
    """A PIL image opened lazily (header only), or one line for a file Pillow cannot read.
    `path` may be a file object; `name` is what the errors call it (default: the path)."""
    from PIL import Image

    source, path = path, path if name is None else name
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TrainkitError(f"{path} was refused: {str(exc).split(',')[0]} (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error):  # UnidentifiedImageError is an OSError
        raise TrainkitError(f"{path} is not a readable PNG or JPEG image") from None


def load_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One image file as a (C, H, W) uint8 tensor, converted and resized (bilinear) like training data."""
    return decode_image(path, channels, size)


def decode_image(data, channels: int, size: tuple[int, int], name: str | None = None,
                 max_pixels: int | None = None) -> torch.Tensor:
    """load_image for a file's bytes (or its path): the one conversion that `predict`, `serve` and
    image folders share. `max_pixels` refuses a larger image from its header, before decoding."""
    from PIL import Image

    path = name or ("the image" if isinstance(data, (bytes, bytearray)) else data)
    try:
        with warnings.catch_warnings(), _open_image(io.BytesIO(data) if isinstance(data, (bytes, bytearray))
                                                    else data, path) as img:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise Image.DecompressionBombError(f"Image size ({img.width * img.height} pixels) exceeds limit "
                                                   f"of {max_pixels} pixels")
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != size[::-1]:
                img = img.resize(size[::-1], Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TrainkitError(f"{path} was refused: {str(exc).split(',')[0]} (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error):
        # Pillow reports damaged files with any of these, depending on the format and the damage.
        raise TrainkitError(f"{path} is not a readable PNG or JPEG image") from None
    return torch.from_numpy(array.copy()).reshape(size[0], size[1], channels).permute(2, 0, 1).contiguous()


_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def _is_gray(img) -> bool:
    """From the header: a grayscale mode, or a palette whose every colour is a gray."""
    if img.mode == "P":
        palette = img.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return img.mode in _GRAY_MODES


def folder_format(paths: list[Path]) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of a folder of images from their headers only: 3 if any image is in
    colour, else 1; the most common size (the larger one on a tie)."""
    sizes, colour = {}, False
    for path in paths:
        with _open_image(path) as img:
            colour = colour or not _is_gray(img)
            hw = (img.height, img.width)
        sizes[hw] = sizes.get(hw, 0) + 1
    size = max(sizes, key=lambda hw: (sizes[hw], hw))
    return (3 if colour else 1), size


def _scan(folder: Path) -> list[tuple[Path, str]]:
    return sorted((p, p.parent.name) for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 (N, C, H, W) images, in [0, 1] units. The sums
    are taken in float64 over chunks of about 16M pixels, so they are exact and a large dataset is
    never held as floats whole."""
    c = images.shape[1]
    total, squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(max(1, (1 << 24) // max(images[0].numel(), 1))):
        x = chunk.transpose(0, 1).reshape(c, -1).double()
        total += x.sum(1)
        squares += x.square().sum(1)
    n = max(images.numel() // max(c, 1), 1)
    mean = total / n
    var = (squares - n * mean.square()).clamp_min(0) / max(n - 1, 1)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).clamp_min(1e-3).tolist())


def load_image_folder(root: Path, channels: int | None = None, size: tuple[int, int] | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Read `root/<class>/*.png`; `root/train` and `root/test` (if present) are used as the split.
    `channels` and `size` default to the folder's own (colour if any image is, the most common size)."""
    if not root.is_dir():
        raise TrainkitError(f"image folder {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _scan(root / "train"), _scan(root / "test")
    else:
        items = _scan(root)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(items) * test_fraction))) if len(items) > 1 else 0
        test = [items[i] for i in order[:n_test]]
        train = [items[i] for i in order[n_test:]]
    classes = sorted({label for _, label in train + test})
    if len(classes) < 2 or not train or not test:
        raise TrainkitError(f"image folder {root} needs at least two class subfolders of PNG/JPEG "
                            f"images (found {len(classes)} classes, {len(train) + len(test)} images)")
    if channels is None or size is None:
        found_channels, found_size = folder_format([p for p, _ in train + test])
        channels, size = channels or found_channels, size or found_size
    index = {c: i for i, c in enumerate(classes)}

    def stack(items):
        images = torch.empty((len(items), channels, *size), dtype=torch.uint8)   # filled in place: no copy
        for i, (path, _) in enumerate(items):
            images[i] = load_image(path, channels, size)
        return images, torch.tensor([index[c] for _, c in items], dtype=torch.int64)

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    mean, std = channel_stats(train_x)
    return ImageData(f"imagefolder:{root}", train_x, train_y, test_x, test_y, classes, mean, std)


def convert_images(data: ImageData, channels: int | None = None, size: tuple[int, int] | None = None) -> ImageData:
    """The data with `channels` (1: luminance, as PIL's "L"; 3: gray repeated) and `size` (bilinear,
    antialiased); the same object when nothing changes, so MNIST stays exactly the seed's."""
    c, h, w = data.image_shape
    if channels in (None, c) and size in (None, (h, w)):
        return data

    def fit(x):                                        # (N, c, h, w) uint8 -> (N, channels, H, W) uint8
        if x is None:
            return None
        if channels == 1 and x.shape[1] == 3:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        if size is not None and tuple(x.shape[2:]) != tuple(size):   # before gray is repeated: a third of the work
            x = torch.nn.functional.interpolate(x.float(), size=tuple(size), mode="bilinear", antialias=True,
                                                align_corners=False).round().clamp(0, 255).to(torch.uint8)
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()

    train_x = fit(data.train_images)
    mean, std = channel_stats(train_x) if len(train_x) else (data.mean, data.std)
    return ImageData(data.name, train_x, data.train_labels, fit(data.test_images), data.test_labels, data.classes,
                     mean, std, fit(data.val_images), data.val_labels)


DATASETS = Registry("dataset")


@DATASETS.register("mnist")
def mnist(arg: str | None, data_dir: Path, channels: int | None, progress: bool) -> ImageData:
    return load_idx_dataset(MNIST, data_dir, progress=progress)


@DATASETS.register("fashion-mnist")
def fashion_mnist(arg: str | None, data_dir: Path, channels: int | None, progress: bool) -> ImageData:
    return load_idx_dataset(FASHION_MNIST, data_dir, progress=progress)


@DATASETS.register("kmnist")
def kmnist(arg: str | None, data_dir: Path, channels: int | None, progress: bool) -> ImageData:
    return load_idx_dataset(IDX_DATASETS["kmnist"], data_dir, progress=progress)


@DATASETS.register("cifar10")
def cifar10(arg: str | None, data_dir: Path, channels: int | None, progress: bool) -> ImageData:
    return load_cifar(CIFAR_DATASETS["cifar10"], data_dir, progress=progress)


@DATASETS.register("cifar100")
def cifar100(arg: str | None, data_dir: Path, channels: int | None, progress: bool) -> ImageData:
    return load_cifar(CIFAR_DATASETS["cifar100"], data_dir, progress=progress)


@DATASETS.register("imagefolder")
def imagefolder(arg: str | None, data_dir: Path, channels: int | None, progress: bool,
                size: tuple[int, int] | None = None) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset imagefolder needs a folder: imagefolder:PATH")
    return load_image_folder(Path(arg), channels, size)


def dataset_loader(name: str):
    """The registered loader for `name` ("mnist", or "imagefolder:PATH" with its argument), checked
    before any data is read."""
    key, _, arg = name.partition(":")
    return DATASETS.get(key), arg or None


def load_dataset(name: str, data_dir: Path, channels: int | None = None, progress: bool = True,
                 size: tuple[int, int] | None = None, limit_train: int | None = None,
                 limit_test: int | None = None) -> ImageData:
    """Build a dataset by its registered name (mnist, cifar10, imagefolder:PATH...), with `channels`
    and `size` (None: the dataset's own). A loader that takes `size` reads its files at that size
    (image folders: straight from each file, as `predict` does); the rest are converted after, only
    the first `limit_train` / `limit_test` images (all by default)."""
    loader, arg = dataset_loader(name)
    takes_size = "size" in inspect.signature(loader).parameters
    data = loader(arg, Path(data_dir), channels, progress, **({"size": size} if takes_size else {}))
    return convert_images(data.limit(limit_train, limit_test), channels, size)


from . import emnist  # noqa: E402,F401  (registers the EMNIST splits; it builds on this module)
