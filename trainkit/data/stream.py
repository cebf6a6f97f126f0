"""Image folders read in batches by DataLoader workers instead of being held whole.

The dataset is the one ImageData type, its images FileImages (paths as one bytes array, labels
int64) instead of a tensor. StreamLoader is a PlannedLoader, as TensorLoader is: the main process
plans each epoch the same way (`loaders.epoch_batches`: the permutation and the augmentation
draws from the run's seeded generator); the workers only decode the files of each planned batch
with `data.images.decode_image`, the conversion that the in-memory path and `predict` use. So a
streamed run sees the same pixels, in the same order, augmented the same way, and resumes
mid-epoch the same way (PlannedLoader's state_dict).

Mean and std come from a bounded sample of the training files (`sample_stats`), not from every image.

The image cache (`cached_images`): before the first epoch, every file of the folder is decoded once,
by a pool of `stream_workers()` processes, into one uint8 file (data/cache.py, FFCV's .beton idea)
in `cachedir.cache_dir()/images` (not the run folder: a later run on the folder reuses it), named
after the folder and the channels, size and resize, and keyed by the fingerprint of the files'
names, sizes and digests (the manifest's). Built up front rather than by the first epoch's workers:
the pool has every core while nothing trains, and no epoch reads from a half-written file. Every
epoch then reads its batches' rows of the file in the main process, with no workers, into one
reused buffer (pinned for a GPU): no memory map, so the process holds a batch, not the pages of the
file it has read (data/cache.py); a folder whose files changed gets a cache built again, over the old one. $TRAINKIT_IMAGE_CACHE=off,
or a disk without room for it, streams from the files as above. The pixels are decode_image's
either way, so the batches are the same.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cachedir import cache_dir
from ..checkpoint import LOCK
from ..errors import TrainkitError
from .cache import build_cache, cache_file, open_cache
from .dataset import FileImages, ImageData, channel_stats
from .folders import (announce, choose_format, deep_rule, file_sources, folder_format, relative_name, report_skipped,
                            report_warnings, split_folder, without_name)
from .loaders import PlannedLoader, normalize
from .manifest import fingerprint
from .registry import DATASETS, DatasetSpec, parse_dataset

STATS_SAMPLE = 2048          # training images that mean and std are computed from, at most,
STATS_BYTES = 16 * 2**20     # and at most this many bytes of them (at least 256 images)
FORMAT_SAMPLE = 256          # headers read to estimate an image folder's size when channels/size are not given
MAX_WORKERS = 8
PREFETCH = 2                 # batches each worker reads ahead
CACHE_RESERVE = 512 * 2**20  # disk space an image cache leaves free, at least


# ---------------------------------------------------------------------------------------------
# How much memory the in-memory path may take, and whether to stream

def parse_bytes(text: str, what: str) -> int:
    """"2G", "500M", "64k", "1000000" -> bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        number = math.nan
    if not 0 <= number < math.inf:
        raise TrainkitError(f"{what} must be a size in bytes such as 2G, 500M or 1000000, got {text[:80]!r}")
    return int(number * units[unit])


def available_memory() -> int:
    """Bytes of memory the system can give without swapping (MemAvailable), else its total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(device: torch.device | None = None) -> int:
    """What a dataset held whole may take: $TRAINKIT_MEMORY_BUDGET (e.g. 2G), else half of the
    available memory, and on a GPU also half of its free memory (the in-memory path keeps the
    images on the device)."""
    text = os.environ.get("TRAINKIT_MEMORY_BUDGET", "").strip()
    if text:
        return parse_bytes(text, "TRAINKIT_MEMORY_BUDGET")
    budget = available_memory() // 2
    if device is not None and device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    return budget


def stream_workers() -> int:
    """DataLoader workers: $TRAINKIT_STREAM_WORKERS, else one per usable core, at most MAX_WORKERS.
    The count never changes what is computed, only how fast the files are read."""
    text = os.environ.get("TRAINKIT_STREAM_WORKERS", "").strip()
    if text:
        if not text.isdigit():
            raise TrainkitError(f"TRAINKIT_STREAM_WORKERS must be a count of workers (0 or more), got {text[:80]!r}")
        return int(text)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


def cache_enabled() -> bool:
    """$TRAINKIT_IMAGE_CACHE: on (the default) or off. An environment variable, not a setting: the
    cache changes where the pixels are read from, never what a run computes (so config.json,
    --resume and compare have nothing to record about it), like the worker count."""
    text = os.environ.get("TRAINKIT_IMAGE_CACHE", "").strip().lower()
    if text in ("", "on", "1", "yes"):
        return True
    if text in ("off", "0", "no"):
        return False
    raise TrainkitError(f"TRAINKIT_IMAGE_CACHE must be on or off, got {text[:80]!r}")


# ---------------------------------------------------------------------------------------------
# The file list of an image folder

@dataclass
class FileList:
    """Image files and their labels: paths as one numpy bytes array (no Python object per file, so
    forked workers do not copy it page by page), labels (N,) int64."""

    paths: np.ndarray
    labels: torch.Tensor

    @classmethod
    def of(cls, items: list[tuple[Path, str]], index: dict[str, int]) -> "FileList":
        paths = np.array([os.fsencode(p) for p, _ in items], dtype=np.bytes_)
        return cls(paths, torch.tensor([index[c] for _, c in items], dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def subset(self, indices) -> "FileList":
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return FileList(self.paths[indices.numpy()], self.labels[indices])


@dataclass
class FolderFiles:
    """An image folder's split as file lists (data.folders.split_folder's, which the in-memory
    path reads too), with the files it left out."""

    root: Path
    layout: str
    train: FileList
    test: FileList
    val: FileList | None
    classes: list[str]
    skipped: list[tuple[Path, str]]
    warnings: list[str] = field(default_factory=list)    # about class folders, one line each

    def splits(self) -> dict[str, FileList]:
        return {"training": self.train, "validation": self.val, "test": self.test}


def folder_files(root: Path, seed: int = 0) -> FolderFiles:
    """The file lists of an image folder. Its scan's Path objects (hundreds of bytes each) are
    gone when this returns, before any worker is forked."""
    split = split_folder(root, seed)
    index = split.index()
    val = FileList.of(split.val, index) if split.val is not None else None
    return FolderFiles(root, split.layout, FileList.of(split.train, index), FileList.of(split.test, index), val,
                       split.classes, split.skipped, split.warnings)


def decoded_bytes(files: FolderFiles, channels: int | None, size: tuple[int, int] | None) -> int:
    """Bytes that the files take decoded as uint8 (N*C*H*W); the folder's own channels and size are
    estimated from a few training files' headers when not given."""
    if channels is None or size is None:
        step = max(1, len(files.train) // FORMAT_SAMPLE)
        found, _ = folder_format([files.train.path(i) for i in range(0, len(files.train), step)])
        found_channels, found_size = found or (3, (1, 1))
        channels, size = channels or found_channels, size or found_size
    count = sum(len(f) for f in files.splits().values() if f is not None)
    return count * channels * size[0] * size[1]


def folder_to_stream(dataset: "DatasetSpec | str", pipeline: str, channels: int | None, size: tuple[int, int] | None,
                     device: torch.device | None = None, seed: int = 0) -> FolderFiles | None:
    """The FolderFiles of the image folder `dataset` (a flat folder split from `seed`) when the run
    should stream it: --pipeline stream, or auto with decoded images larger than `memory_budget`.
    None: hold it."""
    spec = parse_dataset(dataset)
    streams = spec.source in DATASETS and DATASETS[spec.source].streams    # a fact on the registry entry
    if pipeline not in ("auto", "stream") or (streams and not spec.arg):
        return None     # (no folder given: the dataset's own error says so)
    if not streams:
        if pipeline == "stream":
            raise TrainkitError(f"--pipeline stream reads image folders (--dataset imagefolder:PATH); {spec} "
                                f"is read into memory: leave --pipeline at auto or tensor")
        return None
    files = folder_files(Path(spec.arg), seed)
    if pipeline == "auto" and decoded_bytes(files, channels, size) <= memory_budget(device):
        return None
    return files


# ---------------------------------------------------------------------------------------------
# Reading batches of files in DataLoader workers

class _BatchFiles(torch.utils.data.Dataset):
    """dataset[list of indices] -> (B, C, H, W) uint8, or the error line of the first bad file (a
    string: an exception raised in a worker would reach the main process as a traceback)."""

    def __init__(self, images: FileImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices):
        try:
            return self.images.read(indices)
        except TrainkitError as exc:
            return str(exc)


class _PlannedBatches(torch.utils.data.Sampler):
    """Hands the workers the index lists the main process planned for this pass."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _close_run_locks() -> None:
    """Close this (forked) process's copies of a run folder's lock descriptor: a flock lasts while
    any process holds one, so a worker that outlives its run (in a notebook, or for the seconds
    it takes to notice that a killed run is gone) would otherwise keep `--resume` out."""
    folder = "/proc/self/fd"
    if not os.path.isdir(folder):
        return                 # not Linux: workers are spawned there, and inherit no descriptor
    for name in os.listdir(folder):
        try:
            if os.readlink(f"{folder}/{name}").endswith(os.sep + LOCK):
                os.close(int(name))
        except OSError:
            pass


def _worker_init(_: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops at a step boundary (SignalStop)
    # and still needs its workers for that; one thread each, as decoding is their only work.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _close_run_locks()


def read_batches(dataloader, sampler: _PlannedBatches, batches: list[torch.Tensor]):
    """uint8 images of each index list in `batches`, read by `dataloader`'s workers, in order."""
    sampler.batches = [b.tolist() for b in batches]
    try:
        for images in dataloader:
            if isinstance(images, str):
                raise TrainkitError(images)
            yield images
    except RuntimeError as exc:   # a worker killed (out of memory?) or gone: one line, no traceback
        if "DataLoader worker" not in str(exc):
            raise
        raise TrainkitError(f"reading the image files failed: {str(exc).splitlines()[0]}") from None


def make_dataloader(images: FileImages, workers: int, persistent: bool, pin_memory: bool = False):
    sampler = _PlannedBatches()
    loader = torch.utils.data.DataLoader(
        _BatchFiles(images), sampler=sampler, batch_size=None, num_workers=workers,
        persistent_workers=persistent and workers > 0, prefetch_factor=PREFETCH if workers else None,
        pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
        # its own generator: a DataLoader draws its workers' seeds from the global one otherwise,
        # which would change the model's initial weights and dropout against the in-memory path
        generator=torch.Generator().manual_seed(0))
    return loader, sampler


def sample_stats(images: FileImages) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1] units, of a sample of the training images chosen at random
    with a fixed seed: STATS_SAMPLE images, fewer when larger than STATS_BYTES. A training set
    that small is taken whole, so its numbers are exactly the in-memory path's (`channel_stats`)."""
    n = len(images)
    count = min(n, STATS_SAMPLE, max(256, STATS_BYTES // math.prod(images.shape[1:])))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:count].sort().values
    if images.cached:
        return channel_stats(images.read(chosen))
    loader, sampler = make_dataloader(images, min(stream_workers(), 4), persistent=False)
    return channel_stats(torch.cat(list(read_batches(loader, sampler, list(chosen.split(256))))))


# ---------------------------------------------------------------------------------------------
# A folder as a dataset of files, and its loader

def load_stream_folder(root: Path, channels: int | None = None, size: tuple[int, int] | None = None,
                       files: FolderFiles | None = None, bad_files: str = "skip", resize: str = "fit") -> ImageData:
    """An image folder as an ImageData whose images are files (FileImages): the split that
    `load_image_folder` reads, at `channels` and `size` (default: the folder's own, from every
    file's header, as in memory). Files whose header cannot be read are left out here, and those
    whose pixels cannot be read when the image cache is built (as the in-memory path leaves them
    out); without the cache, such a file stops the run when a worker meets it (the epoch is
    planned: it cannot be left out then)."""
    files = files or folder_files(root)
    report_warnings(files.warnings)
    splits = {name: f for name, f in files.splits().items() if f is not None}
    paths = [f.path(i) for f in splits.values() for i in range(len(f))]
    total = len(paths) + len(files.skipped)
    channels, size, chosen, no_header = choose_format(root, paths, channels, size)
    bad = {p for p, _ in no_header}
    sources, missing = file_sources([p for p in paths if Path(p) not in bad], root)   # each file read once, here
    if bad_files == "error":             # refused before the cache's build decodes every file
        report_skipped(root, files.skipped + no_header + missing, total, bad_files)
    splits = _without(splits, no_header + missing)
    deep = deep_rule([splits["training"].path(i) for i in range(len(splits["training"]))])
    images = {name: FileImages(f.paths, channels, tuple(size), resize, root, deep=deep) for name, f in splits.items()}
    # The image cache holds pixels decoded without a dataset's rule for 32-bit and float images:
    # a folder that has such images is read from its files.
    images, undecodable = cached_images(root, images, sources) if deep is None else (images, [])
    if undecodable:                      # the same files the in-memory path leaves out
        bad = {os.fsencode(p) for p, _ in undecodable}
        keep = {name: np.array([i for i in range(len(f)) if f.paths[i] not in bad], dtype=np.int64)
                for name, f in splits.items()}
        splits = {name: f.subset(keep[name]) for name, f in splits.items()}
        images = {name: f[keep[name]] for name, f in images.items()}
        gone = {relative_name(p, root) for p, _ in undecodable}
        sources = {name: source for name, source in sources.items() if name not in gone}
    # in the in-memory path's order: the headers, then the pixels (or bytes) file by file
    position = {path: i for i, path in enumerate(paths)}
    unreadable = no_header + sorted(missing + undecodable, key=lambda item: position.get(str(item[0]), 0))
    report_skipped(root, files.skipped + unreadable, total, bad_files)
    for split in ("training", "test"):
        if not len(splits[split]):
            raise TrainkitError(f"image folder {root} has no readable {split} images")
    announce(root, files.layout, len(files.classes), {name: len(f) for name, f in splits.items()}, channels, size,
             chosen, resize)
    mean, std = sample_stats(images["training"])
    val = splits.get("validation")
    return ImageData(f"imagefolder:{root}", images["training"], splits["training"].labels, images["test"],
                     splits["test"].labels, files.classes, mean, std, images.get("validation"),
                     None if val is None else val.labels, sources=sources, deep=deep)


def _without(splits: dict[str, FileList], unreadable: list[tuple[Path, str]]) -> dict[str, FileList]:
    if not unreadable:
        return splits
    bad = {os.fsencode(p) for p, _ in unreadable}
    return {name: f.subset([i for i in range(len(f)) if f.paths[i] not in bad]) for name, f in splits.items()}


# ---------------------------------------------------------------------------------------------
# The image cache: the folder decoded once

def cache_name(root: Path, channels: int, size: tuple[int, int], resize: str) -> str:
    """The cache file's name for a folder read at these settings: one file each, which a build for
    changed files replaces (so stale caches do not pile up)."""
    key = f"{Path(root).resolve()}\n{channels}\n{size[0]}x{size[1]}\n{resize}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    label = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(root).resolve().name)[:40]
    return f"{label}-{digest}"


def cache_room(folder: Path, needed: int) -> str | None:
    """None when the disk holding `folder` has room for `needed` bytes and CACHE_RESERVE more;
    else what it lacks, in words."""
    probe = Path(folder).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as exc:
        return f"cannot tell the free space on {probe}: {exc.strerror or exc}"
    if free >= needed + CACHE_RESERVE:
        return None
    return f"it needs {needed / 2**20:,.0f} MB and {probe} has {free / 2**20:,.0f} MB free"


def cached_images(root: Path, images: dict[str, FileImages], sources: dict[str, tuple[int, str]]
                  ) -> tuple[dict[str, FileImages], list[tuple[Path, str]]]:
    """(Each split's FileImages pointed at the folder's image cache (see the module's docstring):
    opened when one was made from these very files, else built now, and (file, reason) of each
    file whose pixels could not be decoded then: still in the splits, for the caller to leave out.)
    Unchanged, and no file found bad, when the cache is off or the disk has no room for it (one line)."""
    if not cache_enabled() or not images:
        return images, []
    first = next(iter(images.values()))
    channels, size, resize = first.channels, first.size, first.resize
    path_of = {}
    for split in images.values():
        path_of.update(zip(split.names(), (split.path(i) for i in range(len(split)))))
    names = sorted(path_of)                 # rows in name order: one cache serves every seed's split
    shape = (len(names), channels, *size)
    folder, name = cache_dir() / "images", cache_name(root, channels, size, resize)
    with _held(folder / f".{name}.lock") as why_not:
        if why_not is not None:
            print(f"trainkit: warning: no image cache for {root}: {why_not}; the files are decoded every epoch",
                  file=sys.stderr, flush=True)
            return images, []
        pixels, bad_rows = _open_or_build(root, folder, name, [path_of[n] for n in names],
                                          fingerprint(names, sources), shape, resize)
    if pixels is None:
        return images, []
    row = {n: i for i, n in enumerate(names)}
    undecodable = [(Path(path_of[names[i]]), without_name(message, path_of[names[i]])) for i, message in bad_rows]
    return {split: f.with_cache(pixels, [row[n] for n in f.names()]) for split, f in images.items()}, undecodable


@contextlib.contextmanager
def _held(lock: Path):
    """An exclusive flock on `lock` while a cache is opened or built, so that a second process (another
    torchrun rank, a run started alongside) waits and opens what the first built rather than
    decoding the folder too. Yields None, or why the cache folder cannot be written."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        yield f"cannot write in {lock.parent}: {exc.strerror or exc}"
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield None
    finally:
        os.close(fd)


def _open_or_build(root: Path, folder: Path, name: str, paths: list[str], key: str, shape: tuple[int, ...],
                   resize: str):
    """(The opened cache (data/cache.py's ImageCache), built first if need be; None when the disk has
    no room (one line), and (row, message) of each file that could not be decoded into it.)"""
    channels, size = shape[1], tuple(shape[2:])
    pixels = open_cache(folder, key, shape, resize, name=name, paths=paths)
    where = cache_file(folder, name)
    bad_rows = []
    if pixels is None:
        room = cache_room(folder, math.prod(shape))
        if room is not None:
            print(f"trainkit: warning: no image cache for {root}: {room}; the files are decoded every epoch",
                  file=sys.stderr, flush=True)
            return None, []
        print(f"Image cache: decoding {len(paths)} images once into {where} ({math.prod(shape) / 2**20:,.0f} MB)",
              flush=True)
        start = time.perf_counter()
        build_cache(paths, channels, size, resize, key, folder, stream_workers(), name=name, unreadable=bad_rows)
        seconds = time.perf_counter() - start
        print(f"Image cache: {len(paths)} images decoded in {seconds:.1f} s ({len(paths) / max(seconds, 1e-9):,.0f} "
              f"images/s); every epoch reads it", flush=True)
        pixels = open_cache(folder, key, shape, resize, name=name)
        if pixels is None:
            raise TrainkitError(f"the image cache {where} was written but cannot be read back; "
                                f"run with TRAINKIT_IMAGE_CACHE=off to read the files instead")
    else:
        print(f"Image cache: {where} (made from these files before)", flush=True)
        bad_rows = pixels.unreadable              # checked by open_cache: these files still cannot be decoded
    return pixels, bad_rows


class StreamLoader(PlannedLoader):
    """(images, labels) batches of FileImages, decoded by DataLoader workers: the same batches as a
    TensorLoader over the decoded images with the same arguments (see the module's docstring); the
    plan, the augmentation and the resume are PlannedLoader's.

    The workers start with the first epoch and stay (`persistent`: the training loader); each
    reads PREFETCH batches ahead, so memory holds a few batches, whatever the folder's size.
    """

    def __init__(self, images: FileImages, labels: torch.Tensor, batch_size: int, *, workers: int | None = None,
                 persistent: bool = False, **kwargs):
        super().__init__(labels, batch_size, **kwargs)
        self.images = images
        self._args = (images, stream_workers() if workers is None else workers, persistent,
                      self.device.type == "cuda")
        self._loader = None       # made at the first pass, so that building a run starts no process
        self._buffers = None      # the image cache's batches are read into these (_read_cache)

    def _read(self, plan):
        if self.images.cached:    # rows of the image cache, read here: no workers
            yield from self._read_cache(plan)
            return
        plan = list(plan)         # the workers are handed the whole pass's index lists at once
        if self._loader is None:
            self._loader = make_dataloader(*self._args)
        images = read_batches(*self._loader, [idx for idx, _ in plan])
        for (idx, draws), batch in zip(plan, images):
            yield (batch.to(self.device, non_blocking=True), self.labels[idx].to(self.device, non_blocking=True)), draws

    def _read_cache(self, plan):
        """Each batch's rows read into one of two buffers made once: a batch is used (turned into the
        model's float input, or copied to the GPU) before its buffer is read into again."""
        if self._buffers is None:
            cuda = self.device.type == "cuda"
            self._buffers = [torch.empty((self.batch_size, *self.images.shape[1:]), dtype=torch.uint8,
                                         pin_memory=cuda) for _ in range(2 if cuda else 1)]
            self._copied = [None] * len(self._buffers)
        for i, (idx, draws) in enumerate(plan):
            k = i % len(self._buffers)
            if self._copied[k] is not None:
                self._copied[k].synchronize()     # its last batch has reached the GPU
            images = self.images.read(idx, out=self._buffers[k].numpy())
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                self._copied[k] = torch.cuda.Event()
                self._copied[k].record()
            elif self.device.type != "cpu":
                images = images.to(self.device)
            yield (images, self.labels[idx].to(self.device)), draws


@torch.no_grad()
def predictions(model, loader: StreamLoader, device):
    """reports.predictions for a streamed test set: (outputs, labels, per-image loss, images), the
    images read again only for those a report shows (_ReportImages)."""
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y.cpu())
    out, y = torch.cat(outs), torch.cat(labels)
    losses = torch.nn.functional.cross_entropy(out, y, reduction="none")
    return out, y, losses, _ReportImages(loader.images, loader.mean, loader.std)


class _ReportImages:
    """Files read on demand as the model's (normalized) input: `images[indices]`, for the few
    pictures a report shows (mistakes.png) where the whole set would not fit."""

    def __init__(self, images: FileImages, mean, std):
        self.images, self.mean, self.std = images, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices) -> torch.Tensor:
        return normalize(self.images.read(torch.as_tensor(indices).reshape(-1).tolist()), self.mean, self.std)
