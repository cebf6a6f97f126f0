"""Image files to uint8 tensors: the one decoder that image folders, `predict` and `serve` share.

It keeps what the file holds, as a viewer shows it: EXIF orientation applied, 16-bit, 32-bit and
float pixels scaled to 8 bits by the range they are in (`_scaled_to_eight_bits`), transparency
composited over white (a black digit on a transparent background stays a black digit), a GIF's or
multi-page TIFF's first frame.
Resizing keeps the aspect ratio by default (shorter side to the target, centre crop).

It knows no datasets and no URLs: a path or a file's bytes in, a (C, H, W) uint8 tensor out, and
every file a user can get wrong is one `TrainkitError` line naming it.
"""

from __future__ import annotations

import contextlib
import io
import operator
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TrainkitError

# Suffixes an image folder reads. Whether a file is an image is decided by its content (below),
# these only choose which files of a folder are looked at.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                            ".pbm", ".pgm", ".ppm", ".pnm"})

# The Pillow formats tried when a file is opened. A fixed list, not every plugin Pillow has: some
# (EPS) start external programs, others are never dataset images. (A camera's JPEG that carries a
# second, preview picture comes back as MPO: the JPEG opener makes it, a first frame like a GIF's.)
_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF", "PPM")
_FORMAT_NAMES = "PNG, JPEG, WebP, BMP, TIFF, GIF or PBM/PGM/PPM"

# trainkit's own limit on an image's pixel count, checked from the header before anything is
# decoded (a 20,000 x 20,000 PNG of one colour is 50 KB). It is Pillow's default threshold:
# Pillow only warns between it and twice it, trainkit refuses that zone too.
MAX_PIXELS = 89_478_485

RESIZE_MODES = ("fit", "stretch")

_ORIENTATION = 0x0112                      # the EXIF tag; 5-8 are the ones that swap width and height
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Pillow reports damaged files with any of these, depending on the format and the damage.
_DAMAGED = (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error, IndexError, KeyError)


def decode_image(source: bytes | str | os.PathLike, channels: int, size: tuple[int, int], resize: str = "fit",
                 name: str | None = None, max_pixels: int | None = MAX_PIXELS,
                 deep: "DeepRange | None" = None, background: int = 255) -> torch.Tensor:
    """One image (a path or a file's bytes) as a (channels, H, W) uint8 tensor, `size` = (H, W).

    channels 1 is Pillow's "L" (ITU-R 601-2 luma), 3 is RGB. `resize` "fit" scales the shorter side
    to the target and crops the centre; "stretch" scales to `size` exactly. Both are bilinear and
    agree when the image already has the target's aspect ratio. `name` is what errors call the
    image (default: its path, or "the image" for bytes); an image of more than `max_pixels` pixels
    is refused from its header. `deep`: the dataset's rule for 32-bit and float images
    (`DeepRange`); without it, such an image alone is scaled by its own range. Transparency is
    composited over grey level `background` (white)."""
    size = _check_target(channels, size, resize)
    name = _name(source, name)
    with _opened(source, name, max_pixels) as img:
        try:
            img.load()
            bits = _bit_depth_tag(img)           # read before turning: a turned copy has no format or tags
            img = _upright(img)
            img = _composited(_eight_bit(img, name, bits, deep), background)
        except _DAMAGED as exc:
            raise _damaged(name, exc) from None
    img = img.convert("L" if channels == 1 else "RGB")
    img = _resized(img, size, resize)
    array = np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], channels)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())            # (C, H, W)


def image_info(path: str | os.PathLike, name: str | None = None,
               max_pixels: int | None = MAX_PIXELS) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) an image naturally has, from its header where the format allows: 1 for a
    greyscale image (or a palette of greys), else 3; the size as shown, after EXIF orientation.
    Refuses what `decode_image` would refuse from the header (not an image, too many pixels)."""
    name = _name(path, name)
    with _opened(path, name, max_pixels) as img:
        try:
            channels = 1 if _is_gray(img) else 3
            swap = _orientation(img) in (5, 6, 7, 8)
        except _DAMAGED as exc:
            raise _damaged(name, exc) from None
        return channels, ((img.width, img.height) if swap else (img.height, img.width))


# ---------------------------------------------------------------------------------------------
# Opening: regular files only, a fixed list of formats, the pixel limit from the header

def _check_target(channels: int, size, resize: str) -> tuple[int, int]:
    """`size` as a tuple of two ints (a list or numpy integers are fine)."""
    if channels not in (1, 3):
        raise TrainkitError(f"images are decoded to 1 or 3 channels, not {channels!r}")
    try:
        h, w = (operator.index(side) for side in size)
    except (TypeError, ValueError):
        h = w = 0
    if h < 1 or w < 1:
        raise TrainkitError(f"an image size is two positive integers (height, width), not {size!r}")
    if resize not in RESIZE_MODES:
        raise TrainkitError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    return h, w


def _name(source, name: str | None) -> str:
    if name is not None:
        return name
    return "the image" if isinstance(source, (bytes, bytearray, memoryview)) else os.fsdecode(source)


@contextlib.contextmanager
def _opened(source, name: str, max_pixels: int | None):
    """The PIL image of `source`, header read, pixels not yet decoded."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise TrainkitError(f"{name} is empty (0 bytes), not an image")
            stream = io.BytesIO(source)
        else:
            stream = stack.enter_context(_open_regular_file(source, name))
        yield _pil_open(stream, name, MAX_PIXELS if max_pixels is None else max_pixels)


def _open_regular_file(path, name: str):
    """A binary file object for `path`, which must be a regular file. A FIFO would block open()
    until a writer comes (forever), a device could be read without end: both are refused from
    os.stat before any open(), and again from the opened descriptor (opened non-blocking, so a
    FIFO swapped in between cannot hang it either)."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise TrainkitError(f"{name} does not exist") from None
    except OSError as exc:
        raise TrainkitError(f"{name} cannot be read: {exc.strerror or exc}") from None
    _check_regular(info, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise TrainkitError(f"{name} does not exist") from None
    except OSError as exc:
        raise TrainkitError(f"{name} cannot be read: {exc.strerror or exc}") from None
    try:
        _check_regular(os.fstat(fd), name)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _check_regular(info: os.stat_result, name: str) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise TrainkitError(f"{name} is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise TrainkitError(f"{name} is not a regular file (a FIFO, socket or device), so not an image file")
    if info.st_size == 0:
        raise TrainkitError(f"{name} is empty (0 bytes), not an image")


def _pil_open(stream, name: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow warns between its threshold and twice it; the limit below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()                  # every plugin registered (once), so the list below is known
            img = Image.open(stream, formats=[f for f in _FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError as exc:
        # Pillow refuses above twice its threshold before trainkit sees the size: the count is in its message.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else max_pixels
        raise _bomb(name, int(found.group(1)) if found else None, limit) from None
    except UnidentifiedImageError:
        raise TrainkitError(f"{name} is not a readable image: not a {_FORMAT_NAMES} file") from None
    except _DAMAGED as exc:
        raise _damaged(name, exc) from None
    if img.width * img.height > max_pixels:
        raise _bomb(name, img.width * img.height, max_pixels)
    return img


def _bomb(name: str, pixels: int | None, limit: int) -> TrainkitError:
    size = f"Image size ({pixels} pixels)" if pixels is not None else "Image size"
    return TrainkitError(f"{name} was refused: {size} exceeds limit of {limit:,} pixels (a decompression bomb?)")


def _damaged(name: str, exc: BaseException) -> TrainkitError:
    detail = " ".join(str(exc).split())[:120]
    return TrainkitError(f"{name} is not a readable image: truncated or damaged" + (f" ({detail})" if detail else ""))


# ---------------------------------------------------------------------------------------------
# Pixels as a viewer shows them

def _orientation(img) -> int:
    """The EXIF orientation (1-8) from what the header holds. A PNG keeps its eXIf chunk after the
    pixels at times; Pillow would decode the image to find it, so such a PNG counts as upright here."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except _DAMAGED + (TypeError,):
        return 1                         # damaged EXIF: the pixels are fine, and viewers show them unturned
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(img):
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except _DAMAGED + (TypeError,):
        return img                       # damaged EXIF, as in _orientation


def _is_gray(img) -> bool:
    """From the header: a greyscale mode, or a palette whose every colour is a grey."""
    if img.mode in ("P", "PA"):
        palette = img.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return img.mode in _GRAY_MODES


def _eight_bit(img, name: str, bits: int | None = None, deep: "DeepRange | None" = None):
    """`img` as 8-bit L, LA, RGB or RGBA, every transparency made an alpha channel."""
    from PIL import Image

    mode, transparency = img.mode, img.info.get("transparency")
    if mode in _HIGH_DEPTH_MODES:
        grey = _scaled_to_eight_bits(img, bits, deep)
        if isinstance(transparency, int) and mode != "F":                # a 16-bit tRNS grey key
            alpha = np.where(np.asarray(img) == transparency, 0, 255).astype(np.uint8)
            return Image.fromarray(np.stack([grey, alpha], -1), "LA")
        return Image.fromarray(grey, "L")
    if mode in ("L", "LA", "RGB", "RGBA"):
        if transparency is not None and mode in ("L", "RGB"):
            return img.convert("LA" if mode == "L" else "RGBA")    # a tRNS colour key: those pixels clear
        return img
    if mode in ("P", "PA"):
        return img.convert("RGBA" if mode == "PA" or transparency is not None else "RGB")
    if mode == "1":
        return img.convert("L")
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    try:
        return img.convert("RGB")        # CMYK, YCbCr, RGBX, HSV ...
    except ValueError:
        raise TrainkitError(f"{name} is not a readable image: its colour mode {mode} is not supported") from None


def _scaled_to_eight_bits(img, bits: int | None, deep: "DeepRange | None" = None) -> np.ndarray:
    """A high-bit-depth greyscale image as uint8 (H, W), scaled by the range its values are in and
    rounded, negative values as 0. A 32-bit or float image of a dataset is scaled by the dataset's
    rule (`deep`: the value that is white in all of its images); alone, by its own range:

    - 16-bit (I;16, a PNG's or PGM's "I"): v -> round(v / 257), so 8-bit pixels stored as 16 bits
      (v * 257) come back unchanged;
    - "I" that says its depth (a TIFF's BitsPerSample of 9-31, `bits`): by that depth (a 12-bit
      camera's 4095 is white);
    - 32-bit "I" (a TIFF of 32 bits, or of no depth said): by the range of its values, as the
      tools that write such files mean them: at most 255, 8-bit values (as they are); at most
      65535, 16-bit ones (/ 257); else the 32-bit integer range (/ (2**31 - 1) * 255);
    - floats ("F"): in [0, 1], scaled by 255; else read as the integers are (at most 255 as they
      are, else as 16-bit values), clipped to 0-255; NaN and infinities as 0."""
    values = np.asarray(img)
    white = None if deep is None else deep.floating if img.mode == "F" else deep.integer if bits is None else None
    if white is not None and not img.mode.startswith("I;16"):
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        return np.rint(np.clip(values * (255 / white), 0, 255)).astype(np.uint8)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scale = 255.0 if low >= 0 and high <= 1 else 1.0 if high <= 255 else 255 / 65535
        return np.rint(np.clip(values * scale, 0, 255)).astype(np.uint8)
    if img.mode.startswith("I;16"):
        bits = 16
    elif bits is None:
        high = int(values.max()) if values.size else 0
        bits = 8 if high <= 255 else 16 if high <= 65535 else 31       # 31: int32's largest is 2**31 - 1
    top = (1 << bits) - 1
    values = np.clip(values.astype(np.int64), 0, top)
    return ((values * 510 + top) // (2 * top)).astype(np.uint8)          # round(v * 255 / top)


@dataclass(frozen=True)
class DeepRange:
    """A dataset's one rule for its 32-bit integer and float images (TIFFs): the value that is
    white in every one of them (None: the dataset has none of that kind). Measured once over the
    training images (`measure_deep`), recorded in data.json, and used at eval, predict and serve,
    so that a stored 250 is one grey in every image, whatever each image's own maximum."""

    integer: float | None = None
    floating: float | None = None

    @classmethod
    def from_maxima(cls, integer: float | None, floating: float | None) -> "DeepRange":
        """Values in the type's usual range are read as such (integers 0-255, floats 0-1); a
        dataset beyond it has its own maximum as white."""
        white = lambda top, usual: None if top is None else usual if top <= usual else top
        return cls(white(integer, 255.0), white(floating, 1.0))

    def to_dict(self) -> dict:
        return {"integer_white": self.integer, "float_white": self.floating}

    @classmethod
    def from_dict(cls, saved) -> "DeepRange | None":
        """data.json's record (None when absent or not a rule)."""
        if not isinstance(saved, dict):
            return None
        number = lambda v: float(v) if isinstance(v, (int, float)) and 0 < v < float("inf") else None
        rule = cls(number(saved.get("integer_white")), number(saved.get("float_white")))
        return rule if rule != cls() else None

    def line(self, count: int) -> str:
        """What the rule is, in one line, for a dataset of `count` such images."""
        parts = [f"{kind} with {white:,g} as white" for kind, white in
                 (("32-bit integers", self.integer), ("floats", self.floating)) if white is not None]
        return (f"{count} training image(s) are 32-bit or float TIFFs: read as {' and '.join(parts)}, one rule for "
                f"every image of the dataset (recorded in data.json; eval, predict and serve use it)")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def _may_be_deep(source) -> bool:
    """Whether a file may be a 32-bit or float image: only TIFFs are, among the formats read."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:4]) in _TIFF_MAGIC
    return os.fspath(source).lower().endswith((".tif", ".tiff"))


def measure_deep(sources) -> tuple[DeepRange | None, int]:
    """(the dataset's DeepRange, how many images it covers) from its training images (paths, or
    files' bytes); None when none is a 32-bit integer or float TIFF (a TIFF's depth said below 32
    bits, and 16-bit PNGs and PGMs, have their type's range). Unreadable files are left to the
    decoder, which reports them."""
    tops, count = {"I": None, "F": None}, 0
    for source in filter(_may_be_deep, sources):
        try:
            with _opened(source, _name(source, None), MAX_PIXELS) as img:
                if not (img.mode == "F" or img.mode == "I" and _bit_depth_tag(img) is None):
                    continue
                img.load()
                values = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
                mode = img.mode
        except (TrainkitError,) + _DAMAGED:
            continue
        high = float(values.max()) if values.size else 0.0
        tops[mode] = high if tops[mode] is None else max(tops[mode], high)
        count += 1
    if not count:
        return None, 0
    return DeepRange.from_maxima(tops["I"], tops["F"]), count


def _bit_depth_tag(img) -> int | None:
    """The bit depth of an "I" image where its file says it: 16 for a PNG or PGM (16-bit formats;
    Pillow scales a PGM's maxval to 65535), a TIFF's BitsPerSample when below 32. None for a
    32-bit (or unsaid) depth, which _scaled_to_eight_bits reads from the values' range."""
    if img.mode != "I":
        return None
    if img.format in ("PNG", "PPM"):
        return 16
    if img.format != "TIFF":
        return None
    bits = getattr(img, "tag_v2", {}).get(258)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return bits if isinstance(bits, int) and 9 <= bits <= 31 else None


def _composited(img, background: int = 255):
    """LA or RGBA composited over grey level `background` (white: as a viewer shows it); L and RGB as they are."""
    from PIL import Image

    if img.mode not in ("LA", "RGBA"):
        return img
    pixels = np.asarray(img).astype(np.uint32)                           # (H, W, 2 or 4)
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    out = (colour * alpha + background * (255 - alpha) + 127) // 255     # rounded
    return Image.fromarray(out.astype(np.uint8).squeeze(-1) if img.mode == "LA" else out.astype(np.uint8),
                           "L" if img.mode == "LA" else "RGB")


def _resized(img, size: tuple[int, int], resize: str):
    """Bilinear to (H, W) = `size`. "fit" samples only the centred box of the target's aspect
    ratio (one resampling, no second rounding); with the same aspect ratio it is "stretch"."""
    from PIL import Image

    h, w = size
    if (img.height, img.width) == (h, w):
        return img
    box = None
    if resize == "fit" and img.width * h != img.height * w:
        if img.width * h > img.height * w:                                # wider than the target
            crop = img.height * w / h
            box = ((img.width - crop) / 2, 0.0, (img.width + crop) / 2, float(img.height))
        else:
            crop = img.width * h / w
            box = (0.0, (img.height - crop) / 2, float(img.width), (img.height + crop) / 2)
    return img.resize((w, h), Image.BILINEAR, box=box)
