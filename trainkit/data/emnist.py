"""EMNIST: handwritten digits and letters from NIST Special Database 19 in MNIST's format.

Six splits, each a registered dataset: `--dataset emnist-balanced` (47 classes, the usual
benchmark), `emnist-byclass` (62), `emnist-bymerge` (47), `emnist-letters` (26), `emnist-digits`
and `emnist-mnist` (10). The files sit where torchvision puts them:
<data_dir>/EMNIST/raw/emnist-<split>-<train|test>-<images-idx3|labels-idx1>-ubyte (or .gz).

NIST publishes a single archive, gzip.zip (about 535 MB, every split in it), and its MD5 is the
only checksum published: no file inside it has one. So a download is checked against that MD5
before anything is taken out of it, and the four files of the split asked for are extracted
beside it (each decompressed to at most its expected size). Files found already extracted are
checked by structure alone: the IDX header, the published image count, 28x28, labels within the
split's classes. The images are stored transposed; they are turned upright when read.
"""
from __future__ import annotations

import string
import zipfile
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
class ArchiveFile:
    stem: str
    gz_md5: str


ARCHIVE = ArchiveFile("gzip.zip", "58c8d27c78d21e728a6bc7b3cc06412e")   # torchvision's MD5 of it
ARCHIVE_BYTES = 562 << 20      # a little above the published archive's size: a larger file is not it


@dataclass(frozen=True)
class EmnistSplit:
    split: str
    classes: tuple[str, ...]
    train: int                # images in the published files
    test: int
    label_offset: int = 0     # letters are labelled 1-26
    folder: str = "EMNIST"
    mirrors: tuple[str, ...] = ("https://biometrics.nist.gov/cs_links/EMNIST/",)

    @property
    def name(self) -> str:
        return f"emnist-{self.split}"

    def stem(self, part: str, kind: str) -> str:
        return f"emnist-{self.split}-{part}-{kind}-ubyte"

    def shape(self, part: str, kind: str) -> tuple[int, ...]:
        count = getattr(self, part)
        return (count, 28, 28) if kind == "images-idx3" else (count,)


_DIGITS, _UPPER, _LOWER = string.digits, string.ascii_uppercase, string.ascii_lowercase
# bymerge and balanced merge the 15 letters whose capital and small forms look alike into the capital.
_MERGED = tuple(_DIGITS + _UPPER + "abdefghnqrt")

SPLITS = {s.split: s for s in (
    EmnistSplit("byclass", tuple(_DIGITS + _UPPER + _LOWER), 697_932, 116_323),
    EmnistSplit("bymerge", _MERGED, 697_932, 116_323),
    EmnistSplit("balanced", _MERGED, 112_800, 18_800),
    EmnistSplit("letters", tuple(_UPPER), 124_800, 20_800, label_offset=1),   # capital and small merged
    EmnistSplit("digits", tuple(_DIGITS), 240_000, 40_000),
    EmnistSplit("mnist", tuple(_DIGITS), 60_000, 10_000),
)}
PARTS = [(part, kind) for part in ("train", "test") for kind in ("images-idx3", "labels-idx1")]


def _hint(spec: EmnistSplit, path: Path) -> str:
    return (f"delete it (and gzip.zip if it is damaged) and run again to download a fresh copy, or put good "
            f"copies of the {spec.name} files in {path.parent}")


def _extract(spec: EmnistSplit, archive: Path, raw: Path) -> None:
    """Check the archive's MD5, then write the split's four files out of it, each decompressed to
    at most its expected size and renamed into place only when complete."""
    try:
        size = archive.stat().st_size
        if size > ARCHIVE_BYTES:
            raise TrainkitError(f"{archive} is too large ({size} bytes) to be EMNIST's gzip.zip; " + _hint(spec, archive))
        if fetch.file_md5(archive) != ARCHIVE.gz_md5:
            raise TrainkitError(f"{archive} has the wrong MD5 (the published archive's is {ARCHIVE.gz_md5}); "
                                + _hint(spec, archive))
        with zipfile.ZipFile(archive) as zf:
            for part, kind in PARTS:
                stem, limit = spec.stem(part, kind), idx_bytes(spec.shape(part, kind))
                data = fetch.gunzip(zf.read(f"gzip/{stem}.gz"), limit)
                if len(data) > limit:
                    raise TrainkitError(f"gzip/{stem}.gz in {archive} decompresses to more than the {limit} "
                                        f"bytes expected; " + _hint(spec, archive))
                fetch.write_new_file(raw / stem, data)
    except KeyError as exc:
        raise TrainkitError(f"{archive} does not hold {exc.args[0]}; " + _hint(spec, archive)) from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise TrainkitError(f"could not read {archive}: {getattr(exc, 'strerror', None) or exc}; "
                            + _hint(spec, archive)) from None


def _read(spec: EmnistSplit, path: Path, part: str, kind: str) -> tuple[np.ndarray, tuple[int, str]]:
    """The file's array, checked, and the (size, MD5) of its IDX bytes (for the run's manifest)."""
    shape = spec.shape(part, kind)
    expected = idx_bytes(shape)
    limit = expected if path.suffix != ".gz" else expected + expected // 100 + (1 << 16)
    data = fetch.read_limited(path, limit, f"; the {spec.name} file holds {expected}); " + _hint(spec, path))
    if path.suffix == ".gz":
        try:
            data = fetch.gunzip(data, expected)
        except (OSError, EOFError, zlib.error):
            raise TrainkitError(f"{path} is truncated or corrupt (not a valid gzip file); " + _hint(spec, path)) from None
    array = parse_idx(data, str(path))
    if array.shape != shape:
        raise TrainkitError(f"{path} holds an array of shape {array.shape}, expected {shape} for {spec.name}; "
                            + _hint(spec, path))
    if kind == "labels-idx1" and shape[0]:
        low, high = int(array.min()), int(array.max())
        first, last = spec.label_offset, spec.label_offset + len(spec.classes) - 1
        if low < first or high > last:
            raise TrainkitError(f"{path} holds labels {low}-{high}; {spec.name}'s are {first}-{last}; "
                                + _hint(spec, path))
    return array, (len(data), fetch.md5(data))


def load_emnist(spec: EmnistSplit, root: str | Path, download: bool = True, progress: bool = True) -> ImageData:
    raw = Path(root) / spec.folder / "raw"
    files = {key: fetch.find(raw / n for n in (spec.stem(*key), spec.stem(*key) + ".gz")) for key in PARTS}
    if None in files.values():
        archive = raw / ARCHIVE.stem
        if not archive.is_file():
            if not download:
                missing = next(spec.stem(*key) for key, path in files.items() if path is None)
                raise TrainkitError(f"{spec.name} file {missing} not found in {raw}, nor the archive gzip.zip")
            archive = fetch.download(spec.name, spec.mirrors, ARCHIVE.stem, ARCHIVE.gz_md5, raw, progress,
                                     holds=f"{spec.folder}/raw/ (the archive gzip.zip, or its emnist-{spec.split}-* files)")
        _extract(spec, archive, raw)
        files = {key: raw / spec.stem(*key) for key in files}
    read = {key: _read(spec, path, *key) for key, path in files.items()}
    arrays = {key: array for key, (array, _) in read.items()}
    upright = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 1))).unsqueeze(1)
    labels = lambda a: torch.from_numpy(a.astype(np.int64) - spec.label_offset)
    train = upright(arrays["train", "images-idx3"])
    mean, std = channel_stats(train)
    return ImageData(spec.name, train, labels(arrays["train", "labels-idx1"]),
                     upright(arrays["test", "images-idx3"]), labels(arrays["test", "labels-idx1"]),
                     list(spec.classes), mean, std,
                     sources={spec.stem(*key): record for key, (_, record) in read.items()})


def _register(split: str) -> None:
    def example(folder: Path) -> Example:
        """Two images of every class for training, one for testing, extracted (checked by structure)."""
        spec = SPLITS[split]
        small = replace(spec, train=2 * len(spec.classes), test=len(spec.classes))
        raw = folder / spec.folder / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(3)
        for part, kind in PARTS:
            n = getattr(small, part)
            array = rng.integers(0, 256, (n, 28, 28)) if kind == "images-idx3" \
                else np.arange(n) % len(spec.classes) + spec.label_offset
            (raw / small.stem(part, kind)).write_bytes(encode_idx(array))
        return Example(small.name, folder, (1, 28, 28), swap=((SPLITS, split, small),))

    @register_dataset(f"emnist-{split}", example=example)
    def load(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
        return load_emnist(SPLITS[split], data_dir, progress=options.progress)


for _split in SPLITS:
    _register(_split)
