"""`--dataset npz:FILE`: images and labels saved with numpy.savez, read by numpy (allow_pickle=False:
an array of Python objects is refused, never unpickled).

The arrays are those `keras.datasets` gives (x_train, y_train, x_test, y_test), or images and labels
(20% held out for testing from the seed); images (N, H, W) or (N, H, W, C), C 1 or 3, uint8 or
float in [0, 1]; labels integers from 0 (or (N, 1), as keras's CIFAR); class names from an
optional `classes` array of strings.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from . import fetch
from .dataset import ImageData, class_labels, from_arrays, to_uint8
from .manifest import digest
from .registry import Example, ReadOptions, register_dataset

MAX_BYTES = 8 << 30      # an .npz larger than this is refused before it is read
LAYOUTS = (("x_train", "y_train", "x_test", "y_test"), ("images", "labels"))


def _arrays(path: Path) -> tuple[dict[str, np.ndarray], tuple[int, str]]:
    """The file's arrays by name, and its (size, digest)."""
    raw = fetch.read_limited(path, MAX_BYTES, f"); npz: reads files up to {MAX_BYTES} bytes")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as held:
            if not isinstance(held, np.lib.npyio.NpzFile):
                raise TrainkitError(f"{path} holds one array (numpy.save); npz: reads numpy.savez's x_train, y_train, "
                                    f"x_test, y_test or images, labels")
            return {name: held[name] for name in held.files}, (len(raw), digest(raw))
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise TrainkitError(f"{path} holds an array of Python objects, which would have to be unpickled "
                                f"(it could run code); save numbers (uint8 images, integer labels)") from None
        raise TrainkitError(f"{path} is not a NumPy .npz file: {' '.join(str(exc).split())[:120]}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise TrainkitError(f"{path} is not a readable .npz file ({type(exc).__name__})") from None


def _images(array: np.ndarray, what: str) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) numbers -> (N, C, H, W) uint8."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise TrainkitError(f"{what} has shape {array.shape}; npz: reads images (N, H, W) or (N, H, W, C), C 1 or 3")
    return torch.from_numpy(to_uint8(array, what).transpose(0, 3, 1, 2).copy())


def load_npz(path: Path, seed: int) -> ImageData:
    if not path.is_file():
        raise TrainkitError(f"--dataset npz:{path}: no such file")
    arrays, stamp = _arrays(path)
    layout = next((names for names in LAYOUTS if all(n in arrays for n in names)), None)
    if layout is None:
        raise TrainkitError(f"{path} holds {', '.join(arrays) or 'no arrays'}; npz: reads x_train, y_train, x_test, "
                            f"y_test (as keras.datasets gives them) or images, labels")
    parts = [(_images(arrays[x], f"{path}'s {x}"), arrays[y]) for x, y in zip(layout[::2], layout[1::2])]
    for (images, labels), y in zip(parts, layout[1::2]):
        if len(labels) != len(images):
            raise TrainkitError(f"{path} holds {len(images)} images and {len(labels)} {y}")
    names = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    labels, classes = class_labels(np.concatenate([y for _, y in parts]), f"{path}'s labels", names)
    n = len(parts[0][0])
    train = (parts[0][0], labels[:n])
    test = (parts[1][0], labels[n:]) if len(parts) > 1 else None
    return from_arrays(f"npz:{path}", train, test, classes, {path.name: stamp}, seed)


def _example(folder: Path) -> Example:
    """keras's layout: 24 training and 12 test images of 28x28, 3 classes."""
    rng = np.random.default_rng(3)
    y_train, y_test = np.arange(24) % 3, np.arange(12) % 3
    image = lambda y: (y[:, None, None] * 80 + rng.integers(0, 40, (len(y), 28, 28))).astype(np.uint8)
    np.savez(folder / "small.npz", x_train=image(y_train), y_train=y_train, x_test=image(y_test), y_test=y_test)
    return Example(f"npz:{folder / 'small.npz'}", folder, (1, 28, 28))


@register_dataset("npz", example=_example, arg_is_path=True,
                  summary="npz:FILE: numpy.savez's x_train, y_train, x_test, y_test (or images, labels)")
def npz_dataset(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset npz needs a file: npz:FILE, saved with numpy.savez")
    return load_npz(Path(arg), options.seed)
