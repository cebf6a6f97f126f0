"""`--dataset csv:FILE` and `csv:DIR`: images as rows of pixel numbers, as Kaggle gives MNIST and
Fashion-MNIST (`label,pixel0,...,pixel783`; a test file without the label column), read by pandas.

A row's pixels are the columns other than `label`, in row-major order (a colour image: all its red
values, then green, then blue, as CIFAR's files); the image size comes from their count (784: 28x28
gray, 3,072: 3x32x32) or from --image-size. csv:DIR reads DIR's train file (train.csv or *train.csv)
and its test file (test.csv or *test.csv) when that has labels; else 20% of the training rows are
held out for testing, from the seed, as for a flat image folder.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from . import fetch
from .dataset import TEST_FRACTION, ImageData, class_labels, from_arrays, to_uint8
from .manifest import digest, first_names
from .registry import Example, ReadOptions, register_dataset

LABEL = "label"
MAX_BYTES = 4 << 30      # a CSV larger than this is refused before it is read (Kaggle's train.csv: 73 MB)


def image_shape(columns: int, size: tuple[int, int] | None, what: str) -> tuple[int, int, int]:
    """(C, H, W) of rows of `columns` pixels: --image-size's when it divides them into 1 or 3
    channels, else a square of them (gray), else three squares (colour)."""
    if size is not None and columns % (size[0] * size[1]) == 0 and columns // (size[0] * size[1]) in (1, 3):
        return columns // (size[0] * size[1]), *size
    for channels in (1, 3):
        side = math.isqrt(columns // channels)
        if columns % channels == 0 and side * side * channels == columns and side:
            return channels, side, side
    raise TrainkitError(f"{what} has {columns} pixel columns, which make no square image of 1 or 3 channels; "
                        f"give --image-size HxW with H x W (x 3 for colour) = {columns}")


def read_table(path: Path):
    """(the CSV as a pandas DataFrame, its (size, digest)) in one read of the file."""
    import pandas as pd

    raw = fetch.read_limited(path, MAX_BYTES, f"); csv: reads files up to {MAX_BYTES} bytes")
    try:
        table = pd.read_csv(io.BytesIO(raw), skipinitialspace=True)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TrainkitError(f"{path} is not a CSV file pandas can read: {' '.join(str(exc).split())[:160]}") from None
    if table.empty:
        raise TrainkitError(f"{path} holds no rows")
    return table, (len(raw), digest(raw))


def label_column(table) -> str | None:
    """The name of the label column ("label", in any case), None when there is none."""
    return next((c for c in table.columns if str(c).strip().lower() == LABEL), None)


def pixel_rows(table, path: Path, size: tuple[int, int] | None,
               shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The table's pixel columns as uint8 images (N, C, H, W), of `shape` when given (a test file
    must match its training file), else from the column count."""
    pixels = table.drop(columns=[c for c in [label_column(table)] if c is not None])
    text = [str(c) for c, kind in pixels.dtypes.items() if kind.kind not in "iuf"]
    if text:
        raise TrainkitError(f"{path}: column {text[0]} holds text; csv: reads a label column and pixel "
                            f"columns of numbers")
    if shape is None:
        shape = image_shape(pixels.shape[1], size, str(path))
    elif pixels.shape[1] != math.prod(shape):
        raise TrainkitError(f"{path} has {pixels.shape[1]} pixel columns, its training file {math.prod(shape)}")
    values = to_uint8(pixels.to_numpy(), str(path))
    return torch.from_numpy(values.reshape(len(values), *shape).copy())


def read_pixel_csv(path: Path, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A pixel CSV's images (N, C, H, W) uint8 and its labels' raw values (None without a label
    column): what `trainkit predict RUN FILE.csv` reads."""
    table, _ = read_table(path)
    column = label_column(table)
    return pixel_rows(table, path, size), None if column is None else table[column].to_numpy()


def _files(arg: str) -> tuple[Path, Path | None]:
    """(train file, test file or None) of csv:FILE or csv:DIR."""
    path = Path(arg)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise TrainkitError(f"--dataset csv:{arg}: no such file or folder")
    found = lambda part: sorted(p for p in path.glob(f"*{part}.csv") if p.is_file())
    train, test = found("train"), found("test")
    if not train:
        raise TrainkitError(f"{path} holds no train.csv (or *train.csv): csv:DIR reads one train.csv and at most "
                            f"one test.csv; or give the file itself, csv:FILE")
    if len(train) > 1 or len(test) > 1:
        names = first_names([p.name for p in (train if len(train) > 1 else test)])
        raise TrainkitError(f"{path} holds {names}: csv:DIR reads one train.csv and at most one test.csv; "
                            f"give the file itself, csv:FILE")
    return train[0], test[0] if test else None


def load_csv(arg: str, size: tuple[int, int] | None, seed: int) -> ImageData:
    train_path, test_path = _files(arg)
    table, stamp = read_table(train_path)
    column = label_column(table)
    if column is None:
        raise TrainkitError(f"{train_path} has no label column: training reads label,pixel0,pixel1,... "
                            f"(trainkit predict RUN {train_path} classifies rows without labels)")
    images = pixel_rows(table, train_path, size)
    values, sources = [table[column].to_numpy()], {train_path.name: stamp}
    test_images = None
    if test_path is not None:
        test_table, test_stamp = read_table(test_path)
        if label_column(test_table) is None:
            print(f"{test_path} has no label column, so it is not the test split: {round(len(images) * TEST_FRACTION)} "
                  f"training rows are held out for testing instead (trainkit predict RUN {test_path} --format kaggle "
                  f"classifies its rows)", flush=True)
        else:
            test_images = pixel_rows(test_table, test_path, size, tuple(images.shape[1:]))
            values.append(test_table[label_column(test_table)].to_numpy())
            sources[test_path.name] = test_stamp
    labels, classes = class_labels(np.concatenate(values), f"the label column of {train_path}")
    train = (images, labels[:len(images)])
    test = None if test_images is None else (test_images, labels[len(images):])
    return from_arrays(f"csv:{Path(arg)}", train, test, classes, sources, seed)


def _example(folder: Path) -> Example:
    """Kaggle's layout: train.csv of 24 rows of 28x28 pixels (3 classes), test.csv without labels."""
    import pandas as pd

    rng = np.random.default_rng(2)
    labels = np.arange(24) % 3
    pixels = (labels[:, None] * 80 + rng.integers(0, 40, (24, 784))).astype(np.uint8)
    columns = [f"pixel{i}" for i in range(784)]
    (folder / "kaggle").mkdir(parents=True, exist_ok=True)
    pd.concat([pd.DataFrame({"label": labels}), pd.DataFrame(pixels, columns=columns)], axis=1).to_csv(
        folder / "kaggle" / "train.csv", index=False)
    pd.DataFrame(pixels[:6], columns=columns).to_csv(folder / "kaggle" / "test.csv", index=False)
    return Example(f"csv:{folder / 'kaggle'}", folder, (1, 28, 28))


@register_dataset("csv", example=_example, arg_is_path=True,
                  summary="csv:FILE or csv:DIR: rows of label,pixel0,pixel1,... (Kaggle's MNIST files)")
def csv_dataset(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset csv needs a file or folder: csv:FILE (label,pixel0,pixel1,...) or csv:DIR "
                            "(train.csv and test.csv)")
    return load_csv(arg, options.size, options.seed)
