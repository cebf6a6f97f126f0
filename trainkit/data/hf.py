"""`--dataset hf:DIR`: a Hugging Face dataset on disk, read with the `datasets` package (the `hf`
extra): a folder written by `save_to_disk`, or the Hub's parquet layout (data/train-*.parquet,
data/test-*.parquet). The images are the first column of the `Image` feature (encoded bytes,
decoded by trainkit's own decoder, as image folders are), the labels the first `ClassLabel`
(its names are the classes) or a column named label. Without a test split, 20% of the training
rows are held out for testing from the seed.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from .dataset import ImageData, class_labels, from_arrays
from .folders import deep_rule
from .images import decode_image, image_info
from .registry import Example, ReadOptions, register_dataset

SPLITS = {"train": ("train",), "test": ("test",), "val": ("validation", "valid", "val")}
HUB = ("huggingface.co", 443)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise TrainkitError("--dataset hf: needs the datasets package: pip install 'trainkit[hf]'") from None
    return datasets


def _file_stamp(path: Path) -> tuple[int, str]:
    """(size, BLAKE2b) of a file read in blocks, as data.json records files (manifest.digest)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return path.stat().st_size, h.hexdigest()


def _parquet_splits(folder: Path) -> dict[str, list[Path]]:
    """The Hub's layout: split name -> its parquet files (data/train-00000-of-00001.parquet...)."""
    files = sorted(folder.glob("**/*.parquet"))
    found = {}
    for split, names in SPLITS.items():
        parts = [p for p in files if any(p.name.startswith(f"{name}-") or p.stem == name for name in names)]
        if parts:
            found[split] = parts
    return found


def _tables(folder: Path) -> tuple[dict, dict, list[Path]]:
    """(split -> pyarrow Table, the features, the files read) of a folder in either layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = _datasets()
    parquet = _parquet_splits(folder)
    if parquet:
        tables = {split: pa.concat_tables([pq.read_table(f) for f in files]) for split, files in parquet.items()}
        features = datasets.Features.from_arrow_schema(next(iter(tables.values())).schema)
        return tables, features, [f for files in parquet.values() for f in files]
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise TrainkitError(f"{folder} is not a dataset saved with save_to_disk nor the Hub's parquet layout "
                            f"(data/train-*.parquet): {' '.join(str(exc).split())[:120]}") from None
    named = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    tables = {split: named[name].with_format("arrow")[:] for split, names in SPLITS.items()
              for name in names if name in named}
    first = next(iter(named.values()))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return tables, first.features, files


def _columns(features, folder: Path) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names or None) from the features."""
    datasets = _datasets()
    image = next((n for n, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    label = label or next((n for n in features if n.lower() in ("label", "labels")), None)
    if image is None or label is None:
        raise TrainkitError(f"{folder} has the columns {', '.join(features)}; hf: reads an Image column and a "
                            f"ClassLabel (or label) column")
    names = features[label].names if isinstance(features[label], datasets.ClassLabel) else None
    return image, label, names


def _encoded(table, column: str, folder: Path) -> list[bytes]:
    """Each row's image file bytes (an Image feature stores them, or the path of a file)."""
    out = []
    for i, cell in enumerate(table.column(column).to_pylist()):
        data = cell.get("bytes") if isinstance(cell, dict) else None
        if data is None and isinstance(cell, dict) and cell.get("path") and Path(cell["path"]).is_file():
            data = Path(cell["path"]).read_bytes()
        if not data:
            raise TrainkitError(f"{folder}: row {i} of column {column} holds no image bytes")
        out.append(data)
    return out


def _natural_format(encoded: list[bytes], folder: Path) -> tuple[int, tuple[int, int]]:
    """As an image folder's: 3 channels if any image is in colour, else 1; the most common size."""
    sizes, colour = {}, False
    for i, data in enumerate(encoded):
        channels, hw = image_info(data, name=f"{folder} image {i}")
        colour = colour or channels == 3
        sizes[hw] = sizes.get(hw, 0) + 1
    return (3 if colour else 1), max(sizes, key=lambda hw: (sizes[hw], hw))


def load_hf(folder: Path, options: ReadOptions) -> ImageData:
    tables, features, files = _tables(folder)
    if "train" not in tables:
        raise TrainkitError(f"{folder} holds no train split (it holds {', '.join(tables) or 'none'})")
    image, label, names = _columns(features, folder)
    encoded = {split: _encoded(table, image, folder) for split, table in tables.items()}
    channels, size = options.channels, options.size
    if channels is None or size is None:
        found = _natural_format(encoded["train"], folder)
        channels, size = channels or found[0], tuple(size or found[1])
    deep = deep_rule(encoded["train"], options.deep)       # 32-bit and float TIFFs: one rule for all
    images = {split: torch.stack([decode_image(data, channels, size, options.resize, name=f"{folder} {split} image {i}",
                                               deep=deep) for i, data in enumerate(rows)])
              for split, rows in encoded.items()}
    values = np.concatenate([np.asarray(tables[split].column(label).to_pylist()) for split in encoded])
    labels, classes = class_labels(values, f"{folder}'s {label} column", names)
    ends = np.cumsum([len(images[split]) for split in encoded]).tolist()
    by_split = dict(zip(encoded, zip(images.values(), torch.tensor_split(labels, ends[:-1]))))
    sources = {p.relative_to(folder).as_posix(): _file_stamp(p) for p in files}
    data = from_arrays(f"hf:{folder}", by_split["train"], by_split.get("test"), classes, sources, options.seed)
    if "val" in by_split:
        data.val_images, data.val_labels = by_split["val"]
    data.deep = deep
    return data


def _refuse_hub_name(name: str) -> None:
    """hf:NAME that is no folder here: a Hub name, which needs the network (one line, at once)."""
    if os.path.isabs(name) and Path(name).is_relative_to(Path.cwd()):
        name = os.path.relpath(name)           # the run's config made it absolute; the Hub name is relative
    try:
        socket.create_connection(HUB, timeout=3).close()
        online = True
    except OSError:
        online = False
    how = (f"on a machine online, python -c \"import datasets; datasets.load_dataset('{name}').save_to_disk('DIR')\", "
           f"then --dataset hf:DIR")
    if not online:
        raise TrainkitError(f"--dataset hf:{name}: no such folder, and loading a dataset by its Hub name needs the "
                            f"network, which this machine cannot reach ({HUB[0]}); {how}")
    raise TrainkitError(f"--dataset hf:{name}: no such folder; hf: reads a dataset saved on disk: {how}")


def _example(folder: Path) -> Example:
    """The Hub's parquet layout: 24 training and 12 test PNGs of 28x28, a ClassLabel of 3 names."""
    import io

    from PIL import Image

    datasets = _datasets()
    rng = np.random.default_rng(5)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    (folder / "hub" / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("test", 12)):
        rows = []
        for i in range(n):
            buffer = io.BytesIO()
            Image.fromarray((i % 3 * 80 + rng.integers(0, 40, (28, 28))).astype(np.uint8)).save(buffer, format="PNG")
            rows.append({"bytes": buffer.getvalue(), "path": None})
        table = datasets.Dataset.from_dict({"image": rows, "label": [i % 3 for i in range(n)]}, features=features)
        table.to_parquet(str(folder / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    return Example(f"hf:{folder / 'hub'}", folder, (1, 28, 28))


@register_dataset("hf", example=_example, reads_size=True, arg_is_path=True,
                  summary="hf:DIR: a Hugging Face dataset saved with save_to_disk, or the Hub's parquet files")
def hf_dataset(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset hf needs a folder: hf:DIR, a dataset saved with save_to_disk or the Hub's "
                            "parquet files")
    folder = Path(arg)
    if not folder.is_dir():
        _refuse_hub_name(arg)
    return load_hf(folder, options)
