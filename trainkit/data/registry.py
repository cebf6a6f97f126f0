"""`DATASETS`: every source of data, each registered by its own module with the facts the rest
of the code needs about it (how to read it, whether it can be streamed, whether its argument is
a path, and a small example of it for the registry test). `DatasetSpec`: a dataset's name,
parsed once ("imagefolder:PATH" -> source "imagefolder", arg "PATH")."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import TrainkitError
from ..registry import Registry
from .dataset import ImageData, convert_images


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's name, parsed: `source` is the registered name, `arg` what follows the first ':'."""

    source: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.source if self.arg is None else f"{self.source}:{self.arg}"

    @property
    def entry(self) -> "DatasetEntry":
        """The registered source (a TrainkitError listing the known ones and the nearest route
        when there is none)."""
        if self.source not in DATASETS:
            raise TrainkitError(f"unknown dataset {str(self)!r}; choose one of {', '.join(DATASETS)}; "
                                + nearest_route(str(self)))
        return DATASETS.get(self.source)


# Where data in a form trainkit does not read goes instead, by the suffix of the name given.
ROUTES = {".csv": "csv:", ".npz": "npz:", ".parquet": "hf:", ".arrow": "hf:"}


def nearest_route(name: str) -> str:
    """What a one-line refusal of `name` says to use instead: the prefix for a file of a read
    format, an image folder, or else the routes every dataset can take."""
    path = Path(name)
    prefix = ROUTES.get(path.suffix.lower())
    if prefix is not None:
        return f"for this file use --dataset {prefix}{name}"
    if name and path.is_dir():
        return f"for a folder of class folders of images use --dataset imagefolder:{name}"
    return ("for other data use imagefolder:DIR, csv:FILE (label,pixel0,...), npz:FILE (numpy arrays), hf:DIR "
            "(a Hugging Face dataset), or ImageData.from_datasets(train, test, classes) from Python")


def parse_dataset(name: "str | DatasetSpec") -> DatasetSpec:
    """The one place a dataset name is taken apart."""
    if isinstance(name, DatasetSpec):
        return name
    source, _, arg = name.partition(":")
    return DatasetSpec(source, arg or None)


@dataclass(frozen=True)
class ReadOptions:
    """How the files are read: the asked channels and size (None: the dataset's own), and what
    image folders need besides (their split's seed, what to do with bad files, how to resize)."""

    channels: int | None = None
    size: tuple[int, int] | None = None
    progress: bool = True
    seed: int = 0
    bad_files: str = "skip"
    resize: str = "fit"
    deep: object = None       # images.DeepRange: a run's rule for 32-bit and float images (eval --dataset)


@dataclass(frozen=True)
class Example:
    """A small copy of a source, written by its `example` for the registry test: the dataset name
    to ask for, the data folder, the image shape it gives, and (`swap`) the entries of a source's
    table of published files that the test replaces with the example's own (their checksums)."""

    dataset: str
    data_dir: Path
    shape: tuple[int, int, int]
    swap: tuple[tuple[dict, str, object], ...] = ()


@dataclass(frozen=True)
class DatasetEntry:
    """A registered source. `load(arg, data_dir, options)` returns an ImageData at the dataset's own
    channels and size, or at `options`' when `reads_size` (it reads its files at that size itself)."""

    name: str
    load: Callable[[str | None, Path, ReadOptions], ImageData]
    example: Callable[[Path], Example]
    streams: bool = False          # its images are files that --pipeline stream can read in batches
    reads_size: bool = False
    arg_is_path: bool = False      # "name:PATH": the path is made absolute in a run's config.json
    summary: str = field(default="", compare=False)


DATASETS = Registry("dataset")


def register_dataset(name: str, *, example: Callable[[Path], Example], streams: bool = False,
                     reads_size: bool = False, arg_is_path: bool = False, summary: str = ""):
    """Decorator: register `load(arg, data_dir, options) -> ImageData` as the source `name`."""
    def add(load):
        DATASETS.register(name)(DatasetEntry(name, load, example, streams, reads_size, arg_is_path, summary))
        return load
    return add


def canonical_dataset(spec: DatasetSpec) -> DatasetSpec:
    """The same dataset with a path argument made absolute, so that it means the same from any folder."""
    if spec.arg and spec.source in DATASETS and DATASETS[spec.source].arg_is_path:
        return DatasetSpec(spec.source, str(Path(spec.arg).resolve()))
    return spec


def load_dataset(name: "str | DatasetSpec", data_dir: Path, channels: int | None = None, progress: bool = True,
                 size: tuple[int, int] | None = None, limit_train: int | None = None,
                 limit_test: int | None = None, first: bool = False, **options) -> ImageData:
    """Build a dataset by its registered name (mnist, cifar10, imagefolder:PATH...), with `channels`
    and `size` (None: the dataset's own). A source that `reads_size` reads its files at that size
    (image folders: straight from each file, as `predict` does); the rest are converted after, only
    `limit_train` / `limit_test` images drawn class by class from `seed` (all by default).
    `options`: ReadOptions' others (seed: of the subsets and of a flat image folder's split).
    `first`: the first images instead (how runs made before data.json were limited)."""
    spec = parse_dataset(name)
    entry = spec.entry
    read = ReadOptions(channels, size, progress, **options)
    data = entry.load(spec.arg, Path(data_dir), read)
    data = data.limit(limit_train, limit_test) if first else data.subset(limit_train, limit_test, read.seed)
    return convert_images(data, channels, size)
