"""What an image goes through before a trained model sees it, in `trainkit predict`, the /predict
API and the drawing page alike (`prepare_image`, the one function for all three):

- decoded, converted to the run's channels and resized as in training (`data.images.decode_image`, with the run's --resize);
- for a run on handwritten digits like MNIST's (`reads_digits`), framed as MNIST's digits were
  (`frame_digit`): a dark digit on a light background inverted, the ink's bounding box fitted into
  20x20 keeping its aspect ratio, and placed in 28x28 with its centre of mass at the centre.
  A digit drawn large and off-centre, or photographed on paper, then looks like the training data.

Each step that changed the image says so in the notes returned beside it.
"""
from __future__ import annotations


import numpy as np
import torch

from ..errors import TrainkitError

# Runs on these datasets at 1x28x28 read handwritten digits framed as MNIST's (config.json's dataset).
DIGIT_DATASETS = ("mnist", "emnist-digits", "emnist-mnist")
BOX, SIDE = 20, 28          # MNIST: the digit fitted into 20x20, centred by its mass in 28x28
CENTRE = 14.0               # MNIST's mean centre of mass, in pixel indices (13.99, 14.00 over its test set)
INK = 0.1                   # a pixel is ink above this fraction of the brightest (after the background)

NOTE_INVERTED = "inverted: a dark digit on a light background (MNIST's digits are light on dark)"
NOTE_FRAMED = "framed like MNIST: the digit fitted into 20x20 and centred by its mass in 28x28"
NOTE_ON_BLACK = "transparent background shown as black, under light strokes (as MNIST's digits are)"


def reads_digits(dataset: str, image_shape) -> bool:
    """Whether a run's model reads handwritten digits framed as MNIST's."""
    # "mnist:DIR" too: a user's own digits read as MNIST's
    return dataset.partition(":")[0] in DIGIT_DATASETS and tuple(image_shape) == (1, SIDE, SIDE)


def frame_digit(gray: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """A grayscale image (H, W) uint8 of one handwritten digit -> (28, 28) uint8 framed as MNIST's,
    and notes on what was done. A blank image stays blank."""
    from PIL import Image

    a = gray.astype(np.float32)
    notes = []
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    if np.median(border) > 127:           # paper, a white canvas: MNIST's ink is the bright part
        a = 255.0 - a
        border = 255.0 - border
        notes.append(NOTE_INVERTED)
    a = np.clip(a - np.median(border), 0, None)        # a grey background (a photo) is no ink
    peak = a.max()
    if peak <= 0:
        return np.zeros((SIDE, SIDE), np.uint8), notes
    a *= 255.0 / peak                                  # MNIST's strokes reach full brightness
    rows, cols = np.nonzero((a > INK * 255).any(axis=1))[0], np.nonzero((a > INK * 255).any(axis=0))[0]
    crop = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))       # (W, H) for Pillow
    small = np.asarray(Image.fromarray(crop.round().astype(np.uint8)).resize(size, Image.LANCZOS), np.float32)
    small = np.clip(small, 0, 255)
    mass = small.sum()
    ys, xs = np.mgrid[0:small.shape[0], 0:small.shape[1]]
    top = int(round(CENTRE - (ys * small).sum() / mass))
    left = int(round(CENTRE - (xs * small).sum() / mass))
    # placed at (top, left); a lopsided digit may reach past the frame, whose part is cut
    out = np.zeros((SIDE, SIDE), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + small.shape[0], SIDE), min(left + small.shape[1], SIDE)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
    notes.append(NOTE_FRAMED)
    return out.round().astype(np.uint8), notes


def _header(data, name: str | None, max_pixels: int | None) -> tuple[int, tuple[int, int]] | None:
    """(channels, (height, width) as shown, after EXIF orientation) from the image's header, or None
    (decode_image then says why, in its one line)."""
    from .images import image_info
    try:
        return image_info(data, name=name, max_pixels=max_pixels)
    except TrainkitError:
        return None


COLOUR = 24                 # a pixel whose channels differ by more than this is in colour


def _digit_with_background(data, size: tuple[int, int], name: str | None,
                           max_pixels: int | None, deep=None) -> tuple[np.ndarray, list[str]]:
    """A digit's grey pixels (H, W), not resized, a transparent background shown in the colour
    opposite its strokes: over white, white strokes on a transparent canvas would vanish. The image
    is decoded over white and over black: pixels that agree are opaque (the strokes)."""
    from .images import decode_image

    on_white = decode_image(data, 1, size, name=name, max_pixels=max_pixels, deep=deep)[0].numpy()
    on_black = decode_image(data, 1, size, name=name, max_pixels=max_pixels, deep=deep, background=0)[0].numpy()
    opaque = on_white == on_black
    if opaque.all() or not opaque.any() or on_white[opaque].mean() <= 127:
        return on_white, []                        # no transparency, nothing opaque, or dark strokes
    return on_black, [NOTE_ON_BLACK]


def prepare_image(data, dataset: str, image_shape, name: str | None = None,
                  max_pixels: int | None = None, resize: str = "fit", deep=None) -> tuple[torch.Tensor, list[str]]:
    """An image file's bytes (or path) -> uint8 (C, H, W) as the run's model takes it, and notes on
    what was changed beyond a plain resize; `deep`: the run's rule for 32-bit and float images
    (images.DeepRange, from its data.json). Raises TrainkitError for what is not a readable image."""
    from .images import decode_image

    c, h, w = image_shape
    header = _header(data, name, max_pixels)
    if header is None:          # decode_image says what is wrong with it, in one line
        return decode_image(data, c, (h, w), resize, name=name, max_pixels=max_pixels, deep=deep), []
    channels, (ih, iw) = header
    notes = []
    if c == 1 and channels == 3:        # a colour file, whose pixels may still be grey
        rgb = decode_image(data, 3, (ih, iw), name=name, max_pixels=max_pixels, deep=deep).to(torch.int16)
        if (rgb.amax(dim=0) - rgb.amin(dim=0)).max() > COLOUR:
            notes.append("made grayscale: the run's model reads 1-channel images")
    if reads_digits(dataset, image_shape):
        native, shown = _digit_with_background(data, (ih, iw), name, max_pixels, deep)
        framed, framing = frame_digit(native)
        return torch.from_numpy(framed).unsqueeze(0), notes + shown + framing
    if abs(iw / ih - w / h) > 0.05 * (w / h):
        change = "squashed" if resize == "stretch" else "centre-cropped"
        notes.append(f"{change} from {iw}x{ih} to {w}x{h}: the run's model reads {w}x{h} images")
    return decode_image(data, c, (h, w), resize, name=name, max_pixels=max_pixels, deep=deep), notes
