"""Image folders: one subfolder per class. The scan and the train/test split are made here, once,
for both the in-memory path (`load_image_folder`) and the streamed one (`trainkit.stream`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from .dataset import ImageData, channel_stats
from .formats import IMAGE_SUFFIXES, image_info, load_image
from .registry import Example, ReadOptions, register_dataset

TEST_FRACTION = 0.2     # of a folder without train/ and test/, held out for testing


def scan(folder: Path) -> list[tuple[Path, str]]:
    """(file, class name) of every image in `folder`'s class subfolders, sorted."""
    return sorted((p, p.parent.name) for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)


def split_folder(root: Path, seed: int = 0, test_fraction: float = TEST_FRACTION):
    """(train items, test items, classes) of an image folder: root/train and root/test if both
    exist, else a random `test_fraction` of the files, drawn from `seed`, for testing."""
    if not root.is_dir():
        raise TrainkitError(f"image folder {root} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = scan(root / "train"), scan(root / "test")
    else:
        items = scan(root)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(items) * test_fraction))) if len(items) > 1 else 0
        test = [items[i] for i in order[:n_test]]
        train = [items[i] for i in order[n_test:]]
    classes = sorted({label for _, label in train + test})
    if len(classes) < 2 or not train or not test:
        raise TrainkitError(f"image folder {root} needs at least two class subfolders of PNG/JPEG "
                            f"images (found {len(classes)} classes, {len(train) + len(test)} images)")
    return train, test, classes


def folder_format(paths: list[Path]) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of a folder of images from their headers only: 3 if any image is in
    colour, else 1; the most common size (the larger one on a tie)."""
    sizes, colour = {}, False
    for path in paths:
        channels, hw = image_info(path)
        colour = colour or channels == 3
        sizes[hw] = sizes.get(hw, 0) + 1
    size = max(sizes, key=lambda hw: (sizes[hw], hw))
    return (3 if colour else 1), size


def load_image_folder(root: Path, channels: int | None = None, size: tuple[int, int] | None = None,
                      test_fraction: float = TEST_FRACTION, seed: int = 0) -> ImageData:
    """Read `root/<class>/*.png`; `root/train` and `root/test` (if present) are used as the split.
    `channels` and `size` default to the folder's own (colour if any image is, the most common size)."""
    train, test, classes = split_folder(root, seed, test_fraction)
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


def _example(folder: Path) -> Example:
    """Two classes of six 30x30 gray PNGs."""
    from PIL import Image

    for label, value in (("dark", 40), ("light", 220)):
        (folder / "pics" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((30, 30), value + i, np.uint8)).save(folder / "pics" / label / f"{i}.png")
    return Example(f"imagefolder:{folder / 'pics'}", folder, (1, 30, 30))


@register_dataset("imagefolder", example=_example, streams=True, reads_size=True, arg_is_path=True)
def imagefolder(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset imagefolder needs a folder: imagefolder:PATH")
    return load_image_folder(Path(arg), options.channels, options.size)
