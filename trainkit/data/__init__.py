"""The data floor: every dataset trainkit reads, as uint8 images with int64 labels.

    fetch.py     find, download, check MD5s, take files out of archives (knows no format)
    formats.py   IDX and the CIFAR pickle: bytes -> arrays (knows no download)
    images.py    image files -> uint8 tensors: the one decoder (folders, predict, serve)
    dataset.py   ImageData, the one dataset type (images in a tensor, or FileImages); subsets, statistics
    manifest.py  what a run's data was (data.json), and what changed since
    cache.py     a folder's images decoded once into one file, its rows read back by offset
    registry.py  DATASETS (each source's entry and facts), DatasetSpec (a name parsed once), load_dataset
    loaders.py   batches: PlannedLoader (an epoch's plan, resumable), TensorLoader, the torchvision path
    stream.py    folders larger than memory: FileImages on the folder's image cache, StreamLoader
    preprocess.py  an image as a trained model takes it (predict, serve)
    idx.py, cifar.py, emnist.py, folders.py ...   one module per source, each registering itself

A source is one module in this folder: every module here is imported with the package, so its
`@register_dataset` runs. Nothing here imports the config, the engine, the run folder or a command.
"""
from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .dataset import ImageData, channel_stats, convert_images  # noqa: E402
from .registry import DATASETS, DatasetSpec, ReadOptions, load_dataset, parse_dataset  # noqa: E402

__all__ = ["DATASETS", "DatasetSpec", "ImageData", "ReadOptions", "channel_stats", "convert_images",
           "load_dataset", "parse_dataset"]
