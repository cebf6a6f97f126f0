"""The one in-memory dataset type, `ImageData` (uint8 images and int64 labels), and what is
computed on it whatever its source: per-channel statistics, channel and size conversion."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TrainkitError


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
        val, train = validation_indices(len(self.train_labels), size, seed)
        return ImageData(self.name, self.train_images[train], self.train_labels[train], self.test_images,
                         self.test_labels, self.classes, self.mean, self.std,
                         self.train_images[val], self.train_labels[val])


def validation_indices(n: int, size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, kept) indices of `n` training items, sorted: `size` is a fraction or a count.
    Shared by every dataset type, so a file list holds out the same items as its decoded images."""
    count = int(round(size * n)) if size < 1 else int(size)
    if not 0 < count < n:
        raise TrainkitError(f"--val-split {size} leaves {n - count} of {n} training images; "
                            f"give a fraction between 0 and 1 or a count below {n}")
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


def convert_images(data: ImageData, channels: int | None = None, size: tuple[int, int] | None = None) -> ImageData:
    """The data with `channels` (1: luminance, as PIL's "L"; 3: gray repeated) and `size` (bilinear,
    antialiased); the same object when nothing changes, so MNIST stays exactly the seed's."""
    c, h, w = data.image_shape
    if channels in (None, c) and size in (None, (h, w)):
        return data

    def fit(x):                                        # (N, c, h, w) uint8 -> (N, channels, H, W) uint8
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

    train_x = fit(data.train_images)
    mean, std = channel_stats(train_x) if len(train_x) else (data.mean, data.std)
    return ImageData(data.name, train_x, data.train_labels, fit(data.test_images), data.test_labels, data.classes,
                     mean, std, fit(data.val_images), data.val_labels)
