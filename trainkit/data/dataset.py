"""The one in-memory dataset type, `ImageData` (uint8 images and int64 labels), and what is
computed on it whatever its source: per-channel statistics, channel and size conversion."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import TrainkitError
from .manifest import first_names, make_manifest

if TYPE_CHECKING:
    from .cache import ImageCache
    from .images import DeepRange


@dataclass
class FileImages:
    """Images that live in files, decoded when read: (N, C, H, W) uint8 like a tensor of them, but
    only the paths are held, as one numpy bytes array (no Python object per file, so forked
    workers do not copy it page by page). Indexing with a slice or indices gives the files taken.

    `with_cache` points them at the folder's image cache (data/cache.py: the files decoded once
    into one file): then `read` reads their rows of it instead of decoding, the same pixels."""

    paths: np.ndarray
    channels: int
    size: tuple[int, int]
    resize: str = "fit"
    root: Path | None = None          # the folder, for the names in a manifest
    cache: ImageCache | None = None   # (M, C, H, W) uint8: the decoded files (data/cache.py), or None
    deep: DeepRange | None = None     # the dataset's rule for 32-bit and float images (images.DeepRange)
    rows: np.ndarray | None = None    # (N,) int64: each image's row in `cache`

    dtype = torch.uint8

    @classmethod
    def of(cls, paths, channels: int, size: tuple[int, int], resize: str = "fit", root: Path | None = None):
        return cls(np.array([os.fsencode(p) for p in paths], dtype=np.bytes_), channels, tuple(size), resize, root)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, *self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> "FileImages":
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return replace(self, paths=self.paths[index], rows=None if self.rows is None else self.rows[index])

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def with_cache(self, cache: ImageCache, rows) -> "FileImages":
        """These files read from `cache`, image i from its row `rows[i]`."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape != (len(self),) or tuple(cache.shape[1:]) != self.shape[1:]:
            raise ValueError(f"an image cache of shape {tuple(cache.shape)} with {rows.shape} rows does not "
                             f"hold images of shape {self.shape}")
        return replace(self, cache=cache, rows=rows)

    def path(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def names(self) -> list[str]:
        return [Path(os.path.relpath(self.path(i), self.root)).as_posix() for i in range(len(self))]

    def read(self, indices, out: np.ndarray | None = None) -> torch.Tensor:
        """The images at `indices`, decoded in this process (or read from the cache, into `out` when
        given: see ImageCache.read): (B, C, H, W) uint8."""
        from .images import decode_image

        if self.cache is not None:
            index = indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices, dtype=np.int64)
            return torch.from_numpy(self.cache.read(self.rows[index.reshape(-1)], out))
        indices = [int(i) for i in indices]
        if not indices:
            return torch.zeros(0, self.channels, *self.size, dtype=torch.uint8)
        return torch.stack([decode_image(self.path(i), self.channels, self.size, self.resize, deep=self.deep)
                            for i in indices])


@dataclass
class ImageData:
    """A dataset: labels (N,) int64, images (N, C, H, W) uint8, held in a tensor or, for a folder
    larger than memory, in files decoded as they are read (FileImages: `streamed`)."""

    name: str
    train_images: torch.Tensor | FileImages
    train_labels: torch.Tensor
    test_images: torch.Tensor | FileImages
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_images: torch.Tensor | FileImages | None = None   # a validation split held out of the training images
    val_labels: torch.Tensor | None = None
    # What the data was read from, for the run's manifest (data/manifest.py): each source file's
    # (size, digest) by name, and, where images are files, each split's file names in image order.
    sources: dict[str, tuple[int, str]] | None = None
    files: dict[str, list[str]] | None = None
    held_out_test: bool = False     # the test images were drawn from one set (a flat folder, one CSV)
    deep: DeepRange | None = None   # the rule its 32-bit and float images were read by (images.DeepRange)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @property
    def streamed(self) -> bool:
        """Its images are files read in batches (--pipeline stream), not a tensor."""
        return isinstance(self.train_images, FileImages)

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

    def _take(self, train=None, test=None, val=None) -> "ImageData":
        """The data with each split's images (and labels, and file names) taken at the given indices
        or slice (None: the split as it is)."""
        changes = {}
        for split, index in (("train", train), ("test", test), ("val", val)):
            if index is not None and getattr(self, f"{split}_images") is not None:
                changes[f"{split}_images"] = getattr(self, f"{split}_images")[index]
                changes[f"{split}_labels"] = getattr(self, f"{split}_labels")[index]
        if self.files is not None:
            picks = {"train": train, "test": test, "val": val}
            pick = lambda names, index: names[index] if isinstance(index, slice) else [names[i] for i in index.tolist()]
            changes["files"] = {split: names if picks.get(split) is None else pick(names, picks[split])
                                for split, names in self.files.items()}
        return replace(self, **changes)

    def limit(self, train: int | None = None, test: int | None = None) -> "ImageData":
        """The first `train` training and `test` test images (for quick runs from Python)."""
        return self._take(slice(None, train), slice(None, test))

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "ImageData":
        """`train` training and `test` test images drawn at random from `seed`, as many of each class
        as the data allows (--limit-train, --limit-test); None, or a count of all: the split whole."""
        pick_train = balanced_indices(self.train_labels, train, seed)
        pick_test = balanced_indices(self.test_labels, test, seed + 1)
        data = self._take(pick_train, pick_test)
        if pick_test is not None:
            warn_absent(data.test_labels, self.test_labels, self.classes)
        return data

    def split_validation(self, size: float, seed: int = 0) -> "ImageData":
        """Hold `size` training images out for validation: a fraction (0 < size < 1) or a count,
        chosen at random with a fixed seed, so the same run always holds out the same images."""
        val, train = validation_indices(len(self.train_labels), size, seed)
        files = None if self.files is None else {**self.files, "val": [self.files["train"][i] for i in val.tolist()]}
        held = replace(self, val_images=self.train_images[val], val_labels=self.train_labels[val], files=files)
        return held._take(train)


    def manifest(self) -> dict | None:
        """What the data was read from (data/manifest.py), None for data given from Python."""
        if self.sources is None:
            return None
        def names(split):
            images = getattr(self, f"{split}_images")
            return images.names() if isinstance(images, FileImages) else (self.files or {}).get(split)

        splits = {split: (len(labels), names(split)) for split, labels in (("train", self.train_labels),
                  ("val", self.val_labels), ("test", self.test_labels)) if labels is not None}
        made = make_manifest(self.name, self.sources, splits, self.classes)
        if self.deep is not None:        # read back by predict and serve, to read images as training did
            made["deep_images"] = self.deep.to_dict()
        return made


TEST_FRACTION = 0.2     # of a set given as one split (a CSV, an npz of images and labels), held out for testing


def from_arrays(name: str, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor] | None,
                classes: list[str], sources: dict[str, tuple[int, str]], seed: int = 0) -> ImageData:
    """A dataset from uint8 images (N, C, H, W) and int64 labels (N,), as the array sources (csv:,
    npz:, hf:) read them. Without a test split, a random 20% of the training images is held out
    from `seed`, as for a flat image folder. Mean and std are the training images' own."""
    images, labels = train
    held = test is None
    if held:
        if len(labels) < 2:
            raise TrainkitError(f"{name} holds {len(labels)} image(s): too few to hold some out for testing")
        out, kept = validation_indices(len(labels), TEST_FRACTION, seed)
        (images, labels), test = (images[kept], labels[kept]), (images[out], labels[out])
    if not len(labels) or not len(test[1]):
        raise TrainkitError(f"{name} holds no {'training' if not len(labels) else 'test'} images")
    if int(max(labels.max(), test[1].max())) >= len(classes) or int(min(labels.min(), test[1].min())) < 0:
        raise TrainkitError(f"{name} holds labels outside its {len(classes)} classes")
    mean, std = channel_stats(images)
    return ImageData(name, images.contiguous(), labels, test[0].contiguous(), test[1], list(classes), mean, std,
                     sources=sources, held_out_test=held)


def to_uint8(values: np.ndarray, what: str) -> np.ndarray:
    """Pixel values as uint8: integers 0-255 as they are, floats in [0, 1] scaled by 255 and
    rounded; anything else refused in one line naming the range found (`what`: the file)."""
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind not in "iuf" or values.size == 0:
        raise TrainkitError(f"{what} holds {values.dtype} values, not pixel numbers")
    low, high = float(values.min()), float(values.max())
    if values.dtype.kind == "f":
        if not (np.isfinite(low) and np.isfinite(high)):
            raise TrainkitError(f"{what} holds NaN or infinite pixel values (an empty cell?)")
        if 0 <= low and high <= 1:
            return np.rint(values * 255).astype(np.uint8)
        if not np.array_equal(values, np.rint(values)):
            raise TrainkitError(f"{what} holds pixel values from {low:g} to {high:g}: floats are read in [0, 1] "
                                f"and integers in 0-255")
    if low < 0 or high > 255:
        raise TrainkitError(f"{what} holds pixel values from {low:g} to {high:g}; trainkit reads 0-255 "
                            f"(8-bit) or floats in [0, 1]: scale them to one of those first")
    return values.astype(np.uint8)


def class_labels(values: np.ndarray, what: str, names: list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """(int64 labels, class names) of a label column: integers 0..K-1 name classes "0".."K-1"
    (or `names`), other values (text) are classes sorted by name."""
    values = np.asarray(values).reshape(len(values), -1)
    if values.shape[1] != 1:
        raise TrainkitError(f"{what} holds labels of shape {values.shape}: one label per image is read")
    values = values[:, 0]
    if values.dtype.kind in "iu" or values.dtype.kind == "f" and np.array_equal(values, np.rint(values)):
        labels = values.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise TrainkitError(f"{what} holds negative labels ({int(labels.min())}); classes are numbered from 0")
        classes = names or [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
        return torch.from_numpy(labels), list(classes)
    classes, labels = np.unique(values.astype(str), return_inverse=True)
    return torch.from_numpy(labels.astype(np.int64)), [str(c) for c in classes]


def balanced_indices(labels: torch.Tensor, count: int | None, seed: int) -> torch.Tensor | None:
    """`count` indices of `labels` (sorted), drawn at random from `seed`, class by class in turn:
    every class's first draw, then every class's second... so each class has `count / classes`
    where it has that many. None when `count` is None or takes everything (the order untouched)."""
    n = len(labels)
    if count is None or count >= n:
        return None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    drawn = labels[order]
    grouped = torch.argsort(drawn, stable=True)                 # by class, in the drawn order within each
    sizes = torch.bincount(drawn)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty(n, dtype=torch.int64)
    rank[grouped] = torch.arange(n) - starts[drawn[grouped]]    # which draw of its class each one is
    turn = torch.argsort(rank * n + torch.arange(n))            # round by round, in the drawn order
    return order[turn[:count]].sort().values


def warn_empty_classes(data: "ImageData", test_too: bool = True) -> None:
    """One line for each split (training, validation, and test unless a subset's warning says it)
    that holds no image of some class: such a class cannot be learnt, or its accuracy measured."""
    splits = [("training", data.train_labels), ("validation", data.val_labels)] + \
        ([("test", data.test_labels)] if test_too else [])
    for split, labels in splits:
        if labels is None:
            continue
        counts = torch.bincount(labels, minlength=len(data.classes)).tolist()
        absent = [name for name, n in zip(data.classes, counts) if n == 0]
        if absent:
            print(f"trainkit: warning: the {split} images hold no image of {len(absent)} of the "
                  f"{len(data.classes)} classes ({first_names(absent, 5)})", file=sys.stderr)


def warn_absent(subset_labels: torch.Tensor, all_labels: torch.Tensor, classes: list[str]) -> None:
    """One line naming the classes that the test split has and its subset lacks (their accuracy is not measured)."""
    present = set(subset_labels.tolist())
    absent = [classes[c] for c in sorted(set(all_labels.tolist()) - present)]
    if absent:
        print(f"trainkit: warning: the {len(subset_labels)} test images of --limit-test hold no image of "
              f"{len(absent)} classes ({first_names(absent, 5)}): their accuracy is not measured", file=sys.stderr, flush=True)


def validation_indices(n: int, size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, kept) indices of `n` training items, sorted: `size` is a fraction or a count.
    Shared by every dataset type, so a file list holds out the same items as its decoded images."""
    count = int(round(size * n)) if size < 1 else int(size)
    if n < 2:
        raise TrainkitError(f"--val-split needs at least 2 training images, to train on some and hold out the "
                            f"others; there {'is' if n == 1 else 'are'} {n}: leave --val-split out")
    if not 0 < count < n:
        # what works: 1 to n - 1 images, as a count, or as a fraction that rounds to one
        counts = "of 1" if n == 2 else f"from 1 to {n - 1:,}"
        raise TrainkitError(f"--val-split {size} holds out {count:,} of the {n:,} training images; give a count "
                            f"{counts}, or a fraction that holds out that many (round(fraction x {n:,}))")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:count].sort().values, order[count:].sort().values


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


def convert_tensor(x: torch.Tensor | None, channels: int | None, size: tuple[int, int] | None) -> torch.Tensor | None:
    """uint8 images (N, c, h, w) -> (N, channels, H, W): 1 channel is luminance (as PIL's "L"),
    3 is gray repeated; the size bilinear, antialiased. None: that part unchanged."""
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


def convert_images(data: ImageData, channels: int | None = None, size: tuple[int, int] | None = None) -> ImageData:
    """The data with `channels` and `size` (convert_tensor); the same object when nothing changes,
    so MNIST stays exactly the seed's."""
    c, h, w = data.image_shape
    if channels in (None, c) and size in (None, (h, w)) or data.streamed:   # files: decoded at the asked size
        return data
    fit = lambda x: convert_tensor(x, channels, size)
    train_x = fit(data.train_images)
    mean, std = channel_stats(train_x) if len(train_x) else (data.mean, data.std)
    return replace(data, train_images=train_x, test_images=fit(data.test_images), val_images=fit(data.val_images),
                   mean=mean, std=std)
