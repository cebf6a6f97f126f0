"""Batches for training and evaluation.

Two paths produce the same kind of batches (normalized float images, int64 labels):
- `PlannedLoader`: the one resumable loader, the epoch planned from one seeded generator. Its
  `TensorLoader` is trainkit's fast path: the whole dataset is one uint8 tensor on the training
  device; each batch is gathered, augmented and normalized with batched tensor ops
  (`stream.StreamLoader` reads the same planned batches from files instead).
- `torchvision_loader`: the seed's path. PIL transforms per image in DataLoader workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The seed's augmentation: with p=0.1 center-crop 22 then resize to 28, then rotate in +-15 deg.
SEED_ZOOM_P = 0.1
SEED_CROP = 22
SEED_DEGREES = 15.0


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Images (B, C, H, W), uint8 or float in [0, 1] -> the model's input: (x - mean) / std."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images
    return (x - _channel_view(mean, x)) / _channel_view(std, x)


def denormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """The model's float input back to [0, 1] images on the CPU (for pictures)."""
    x = x.float().cpu()
    return (x * _channel_view(std, x) + _channel_view(mean, x)).clamp(0, 1)


def affine_batch(images: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor,
                 mode: str = "bilinear", fill: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate each image counter-clockwise by its angle and magnify it by its scale about the centre.

    images: (B, C, H, W) float; degrees, scales: (B,). Pixels from outside the image are 0, or
    `fill` (B, C, 1, 1): the images are shifted by it, so 0 outside becomes the fill colour.
    One sampling grid per image, so a zoom and a rotation together cost one resampling.
    """
    rad = degrees.to(images.device, torch.float32) * (math.pi / 180)
    inv = 1.0 / scales.to(images.device, torch.float32)
    cos, sin = torch.cos(rad) * inv, torch.sin(rad) * inv
    zero = torch.zeros_like(cos)
    # theta maps output coordinates to input coordinates (normalized, y pointing down).
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)
    return F.grid_sample(images - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill


def border_median(images: torch.Tensor) -> torch.Tensor:
    """Each image's median border pixel per channel: (B, C, H, W) -> (B, C, 1, 1), a colour it has."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], 2)
    return border.median(2).values[:, :, None, None]


@dataclass(frozen=True)
class SeedAugment:
    """The seed's augmentation for a whole batch, each image with its own random draw."""

    zoom_p: float = SEED_ZOOM_P
    zoom: float = 28 / SEED_CROP
    degrees: float = SEED_DEGREES
    fill_border: bool = False     # fill with each image's border colour instead of black (not MNIST's)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random angles (degrees) and scales for n images, drawn on the CPU generator."""
        u = torch.rand(n, 2, generator=generator)
        degrees = (u[:, 0] * 2 - 1) * self.degrees
        scales = torch.where(u[:, 1] < self.zoom_p, self.zoom, 1.0)
        return degrees, scales

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, *self.draw(images.shape[0], generator))

    def apply(self, images: torch.Tensor, degrees: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        # As the seed does: the zoom resamples bilinearly, the rotation takes the nearest pixel
        # (torchvision's RandomRotation default), which keeps the pixel values' spread.
        fill = border_median(images) if self.fill_border else None
        zoomed = (scales != 1).nonzero().squeeze(1).to(images.device)
        if len(zoomed):
            images = images.index_copy(0, zoomed, affine_batch(images[zoomed], degrees[:0].new_zeros(len(zoomed)),
                                                               scales[scales != 1]))
        return affine_batch(images, degrees, torch.ones_like(scales), mode="nearest", fill=fill)


@dataclass(frozen=True)
class FlipCrop:
    """Natural images' augmentation for a whole batch: a horizontal flip with p=0.5, then a
    random crop of the image padded by `pad` pixels (a shift of -pad..pad in x and y). The padding
    mirrors the image, so no colour appears that the images do not have."""

    pad: int = 4

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Flips (n,) bool and integer shifts (n, 2) as (dx, dy), drawn on the CPU generator."""
        u = torch.rand(n, 3, generator=generator)
        return u[:, 0] < 0.5, (u[:, 1:] * (2 * self.pad + 1)).floor() - self.pad

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, *self.draw(images.shape[0], generator))

    def apply(self, images: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        # One nearest-pixel grid_sample does both: x' = +-x + 2dx/W. Integer shifts land on pixel
        # centres exactly, and "reflection" mirrors the image where the shift leaves it.
        b, _, h, w = images.shape
        sign = 1 - 2 * flips.to(images.device, torch.float32)
        shift = shifts.to(images.device, torch.float32) * 2 / torch.tensor([w, h], device=images.device)
        zero = torch.zeros_like(sign)
        theta = torch.stack([torch.stack([sign, zero, shift[:, 0]], 1),
                             torch.stack([zero, zero + 1, shift[:, 1]], 1)], 1)    # (B, 2, 3)
        grid = F.affine_grid(theta.to(images.dtype), [b, 1, h, w], align_corners=False)
        return F.grid_sample(images, grid, mode="nearest", padding_mode="reflection", align_corners=False)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool, augment):
    """One epoch's plan: (indices, augmentation draws or None) per batch, all drawn from `generator`
    in one fixed order (the permutation, then each batch's draws), so that every loader that walks
    the same plan sees the same images augmented the same way."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield idx, (augment.draw(len(idx), generator) if augment is not None else None)


def model_input(images: torch.Tensor, draws, augment, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> the model's float input: scaled, augmented with `draws`, normalized."""
    x = images.float().div_(255)
    if draws is not None:
        x = augment.apply(x, *draws)
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class PlannedLoader:
    """The one resumable loader: (images, labels) batches of an epoch planned by `epoch_batches`.

    The order and the augmentation come from one CPU generator, so a run is the same on every
    device, wherever the images live, and its state can be saved and restored (see state_dict).
    Subclasses only say where the uint8 images of each planned batch come from (`_read`): a
    tensor (`TensorLoader`) or files decoded by workers (`stream.StreamLoader`).

    `batch_size` is the global batch. With `world` > 1 (data-parallel training) every rank
    walks the same permutation and draws the same augmentation for the whole global batch, then
    keeps its own share (positions rank, rank + world, ...): together the ranks see each image
    once per epoch, augmented exactly as a single process with the same batch would.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, *, mean, std, device: torch.device | str = "cpu",
                 shuffle: bool = False, augment: SeedAugment | FlipCrop | None = None, seed: int = 0,
                 channels_last: bool = False, rank: int = 0, world: int = 1):
        self.device = torch.device(device)
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.channels_last = channels_last
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.mean, self.std = mean, std
        self.batches_done, self._skip = 0, 0

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def _plan(self, skip: int):
        """This rank's (indices, draws) of each batch of the epoch; the first `skip` batches'
        draws are made (so the generator is where it was) and their batches left out."""
        mine = slice(self.rank, None, self.world)
        for i, (idx, draws) in enumerate(epoch_batches(len(self.labels), self.batch_size, self.generator,
                                                       self.shuffle, self.augment)):
            if i >= skip:
                yield idx[mine], None if draws is None else tuple(d[mine] for d in draws)

    def _read(self, plan):
        """(uint8 images (B, C, H, W), labels (B,)) on the device, for each (indices, draws) of `plan`."""
        raise NotImplementedError

    def __iter__(self):
        self._epoch_start = self.generator.get_state()
        skip, self._skip = self._skip, 0
        self.batches_done = skip      # resuming mid-epoch: the draws replayed, the work skipped
        plan = self._plan(skip)
        for (images, labels), draws in self._read(plan):
            self.batches_done += 1
            yield model_input(images, draws, self.augment, self.mean, self.std, self.channels_last), labels

    def state_dict(self) -> dict:
        """Where the loader is; saved in the middle of an epoch, it resumes at the next batch. Every
        PlannedLoader reads every other's: a run may resume held in memory what it began streaming."""
        if 0 < self.batches_done < len(self):
            return {"generator": self._epoch_start, "skip": self.batches_done}
        return {"generator": self.generator.get_state(), "skip": 0}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._skip = state.get("skip", 0)


class TensorLoader(PlannedLoader):
    """Batches of a uint8 dataset kept whole on `device`: each one gathered by indexing, one batch
    planned ahead of the one read (the plan is drawn lazily)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, **kwargs):
        super().__init__(labels, batch_size, **kwargs)
        self.images = images.to(self.device)   # (N, C, H, W) uint8
        self.labels = labels.to(self.device)

    def _read(self, plan):
        for idx, draws in plan:
            idx = idx.to(self.device)
            yield (self.images[idx], self.labels[idx]), draws


# ---------------------------------------------------------------------------------------------
# The seed's pipeline: torchvision PIL transforms, one image at a time, in DataLoader workers.

def seed_transforms(mean, std, train: bool, augment: str = "seed", size: tuple[int, int] = (28, 28)):
    """The seed's transforms (its crop of 22 scaled with the image, back to `size`; fill 0), or
    flip-crop (reflect-padded), or none."""
    from torchvision import transforms as T

    crop = (round(size[0] * SEED_CROP / 28), round(size[1] * SEED_CROP / 28))
    steps = {"seed": [T.RandomApply([T.CenterCrop(crop)], p=SEED_ZOOM_P), T.Resize(size),
                      T.RandomRotation((-SEED_DEGREES, SEED_DEGREES), fill=0)],
             "flip-crop": [T.RandomHorizontalFlip(), T.RandomCrop(size, padding=4, padding_mode="reflect")],
             "none": []}[augment if train else "none"]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


class PILImageDataset(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) tensors served as PIL images through a transform, as torchvision does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images.numpy(), labels.numpy(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        image = self.images[i]
        pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        return self.transform(pil), int(self.labels[i])


class _EpochSeededLoader:
    """A DataLoader whose shuffle and worker seeds come from (seed, epoch), so runs can resume."""

    def __init__(self, make, seed: int, length: int):
        self.make, self.seed, self.epoch, self.length = make, seed, 0, length
        self.batches_done, self._skip = 0, 0

    def __len__(self):
        return self.length

    def __iter__(self):
        self.epoch += 1
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.batches_done, skip, self._skip = 0, self._skip, 0
        for batch in self.make(generator):
            self.batches_done += 1
            if self.batches_done > skip:  # resuming mid-epoch: the same batches, the first ones unused
                yield batch

    def state_dict(self) -> dict:
        if 0 < self.batches_done < len(self):
            return {"epoch": self.epoch - 1, "skip": self.batches_done}
        return {"epoch": self.epoch, "skip": 0}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._skip = state["epoch"], state.get("skip", 0)


def torchvision_loader(images, labels, batch_size: int, *, mean, std, train: bool, seed: int = 0,
                       workers: int = 2, pin_memory: bool = False, rank: int = 0, world: int = 1,
                       augment: str = "seed"):
    """The seed's DataLoader over PIL transforms (fp32, one image at a time).

    `batch_size` is the global batch; with `world` > 1 a DistributedSampler gives each rank its
    share of every epoch (batch_size // world images a step).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = PILImageDataset(images, labels, seed_transforms(mean, std, train, augment, tuple(images.shape[2:])))
    sampler = DistributedSampler(dataset, world, rank, shuffle=train, seed=seed) if world > 1 else None

    def make(generator):
        if sampler is not None:
            sampler.set_epoch(int(torch.randint(2**31, (1,), generator=generator)))
        return DataLoader(dataset, batch_size=batch_size // world, shuffle=train and sampler is None,
                          sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                          generator=generator, persistent_workers=False)

    per_rank = len(sampler) if sampler is not None else len(dataset)
    return _EpochSeededLoader(make, seed, length=math.ceil(per_rank / (batch_size // world)))
