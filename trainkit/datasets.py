"""Image datasets read once into uint8 tensors: MNIST, Fashion-MNIST and image folders.

Nothing is ever written into a data folder that already holds the files, so a read-only
folder works. Every file is checked before it is used; a bad one is a TrainkitError that
names the file and says how to fix it.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import os
import signal
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
    raw_md5: str         # md5 of the decompressed bytes
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

IDX_DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST)}


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
        if not gz_ok and _md5(data) != item.raw_md5:
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
        for name in (item.stem, item.stem + ".gz"):
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


def download_file(spec: IdxDataset, item: IdxFile, dest_dir: Path, progress: bool = True) -> Path:
    """Download one .gz from the dataset's mirrors, check its MD5, then move it into place.

    Every mirror together gets download_timeout() seconds; SIGINT / SIGTERM stop it at once.
    Only a complete, checked file ever appears under the final name.
    """
    from tqdm.auto import tqdm

    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainkitError(f"cannot create {dest_dir} to download {spec.name} into: {exc.strerror}") from None
    dest = dest_dir / (item.stem + ".gz")
    timeout = download_timeout()
    deadline = time.monotonic() + timeout
    errors = []
    with _signals_stop(f"downloading {dest}"):
        for mirror in _mirrors(spec):
            url = mirror + item.stem + ".gz"
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
                _fetch(url, os.fdopen(fd, "wb"), deadline,
                       lambda total: tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress))
                if _md5(Path(tmp).read_bytes()) != item.gz_md5:
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
    raise TrainkitError(f"{spec.name} file {item.stem}.gz is missing from {dest_dir} and could not be "
                        f"downloaded ({'; '.join(errors)}); copy the files there, or point --data-dir "
                        f"(or TRAINKIT_DATA_DIR) at a folder holding {spec.folder}/raw/")


def load_idx_dataset(spec: IdxDataset, root: str | Path, download: bool = True, progress: bool = True) -> ImageData:
    root = Path(root)
    arrays = {}
    for key, item in spec.files.items():
        path = _find(spec, root, item)
        if path is None:
            if not download:
                raise TrainkitError(f"{spec.name} file {item.stem} not found in {root / spec.folder / 'raw'}")
            path = download_file(spec, item, root / spec.folder / "raw", progress)
        arrays[key] = read_idx_file(path, spec, item)
    to_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    to_labels = lambda a: torch.from_numpy(a.astype(np.int64))
    return ImageData(spec.name, to_images(arrays["train_images"]), to_labels(arrays["train_labels"]),
                     to_images(arrays["test_images"]), to_labels(arrays["test_labels"]),
                     list(spec.classes), (spec.mean,), (spec.std,))


# ---------------------------------------------------------------------------------------------
# Image folders: one subfolder per class, PNG or JPEG files of any size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One image file as a (C, H, W) uint8 tensor, converted and resized like training data."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize(size[::-1], Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TrainkitError(f"{path} was refused: {str(exc).split(',')[0]} (a decompression bomb?)") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, zlib.error):
        # Pillow reports damaged files with any of these, depending on the format and the damage.
        raise TrainkitError(f"{path} is not a readable PNG or JPEG image") from None
    return torch.from_numpy(array.copy()).reshape(size[0], size[1], channels).permute(2, 0, 1).contiguous()


def _scan(folder: Path) -> list[tuple[Path, str]]:
    return sorted((p, p.parent.name) for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, in [0, 1] units."""
    pixels = images.float().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())


def load_image_folder(root: Path, channels: int = 1, size: tuple[int, int] = (28, 28),
                      test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Read `root/<class>/*.png`; `root/train` and `root/test` (if present) are used as the split."""
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
    index = {c: i for i, c in enumerate(classes)}

    def stack(items):
        images = torch.stack([load_image(p, channels, size) for p, _ in items])
        return images, torch.tensor([index[c] for _, c in items], dtype=torch.int64)

    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    mean, std = channel_stats(train_x)
    return ImageData(f"imagefolder:{root}", train_x, train_y, test_x, test_y, classes, mean, std)


DATASETS = Registry("dataset")


@DATASETS.register("mnist")
def mnist(arg: str | None, data_dir: Path, channels: int, progress: bool) -> ImageData:
    return load_idx_dataset(MNIST, data_dir, progress=progress)


@DATASETS.register("fashion-mnist")
def fashion_mnist(arg: str | None, data_dir: Path, channels: int, progress: bool) -> ImageData:
    return load_idx_dataset(FASHION_MNIST, data_dir, progress=progress)


@DATASETS.register("imagefolder")
def imagefolder(arg: str | None, data_dir: Path, channels: int, progress: bool) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset imagefolder needs a folder: imagefolder:PATH")
    return load_image_folder(Path(arg), channels)


def dataset_loader(name: str):
    """The registered loader for `name` ("mnist", or "imagefolder:PATH" with its argument), checked
    before any data is read."""
    key, _, arg = name.partition(":")
    return DATASETS.get(key), arg or None


def load_dataset(name: str, data_dir: Path, channels: int = 1, progress: bool = True) -> ImageData:
    """Build a dataset by its registered name: mnist, fashion-mnist or imagefolder:PATH."""
    loader, arg = dataset_loader(name)
    return loader(arg, Path(data_dir), channels, progress)
