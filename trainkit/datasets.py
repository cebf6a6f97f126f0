"""The names that trainkit.datasets has always had, now kept in the data package (trainkit/data/):
this module only re-exports them, so that code written against it keeps working."""
from __future__ import annotations

from pathlib import Path

from .data import fetch
from .data.cifar import CIFAR10, CIFAR100, CIFAR_DATASETS, CifarDataset, CifarFile, load_cifar, read_cifar_file
from .data.dataset import ImageData, channel_stats, convert_images
from .data.fetch import DOWNLOAD_TIMEOUT, SOCKET_TIMEOUT, download_timeout
from .data.folders import folder_format, load_image_folder
from .data import images
from .data.formats import parse_idx
from .data.images import IMAGE_SUFFIXES
from .data.idx import (FASHION_MNIST, IDX_DATASETS, KMNIST, MNIST, IdxDataset, IdxFile, idx_size, load_idx_dataset,
                       read_idx_file)
from .data.registry import DATASETS, DatasetSpec, load_dataset, parse_dataset


def decode_image(data, channels: int, size: tuple[int, int], name: str | None = None,
                 max_pixels: int | None = None, resize: str = "fit"):
    """images.decode_image, with this module's old order of arguments."""
    return images.decode_image(data, channels, size, resize, name=name, max_pixels=max_pixels)


def load_image(path: Path, channels: int, size: tuple[int, int], resize: str = "fit"):
    """One image file as a (C, H, W) uint8 tensor (images.decode_image)."""
    return images.decode_image(path, channels, size, resize)


def download_file(spec: IdxDataset, item: IdxFile, dest_dir: Path, progress: bool = True,
                  filename: str | None = None) -> Path:
    """One published file of an IDX dataset (by default the item's .gz), downloaded and MD5-checked."""
    return fetch.download(spec.name, spec.mirrors, filename or item.stem + ".gz", item.gz_md5, Path(dest_dir),
                          progress, holds=spec.folder + "/raw/")


__all__ = ["CIFAR10", "CIFAR100", "CIFAR_DATASETS", "CifarDataset", "CifarFile", "DATASETS", "DOWNLOAD_TIMEOUT",
           "DatasetSpec", "FASHION_MNIST", "IDX_DATASETS", "IMAGE_SUFFIXES", "IdxDataset", "IdxFile", "ImageData",
           "KMNIST", "MNIST", "SOCKET_TIMEOUT", "channel_stats", "convert_images", "decode_image", "download_file",
           "download_timeout", "folder_format", "idx_size", "load_cifar", "load_dataset", "load_idx_dataset",
           "load_image", "load_image_folder", "parse_dataset", "parse_idx", "read_cifar_file", "read_idx_file"]
