"""preprocess.py: images framed as MNIST's digits were, on real MNIST digits and on drawn ones."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainkit.data.preprocess import NOTE_FRAMED, NOTE_INVERTED, frame_digit, prepare_image, reads_digits
from trainkit.errors import TrainkitError


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    return (ys * a).sum() / a.sum(), (xs * a).sum() / a.sum()


def ink_box(a: np.ndarray, level: int = 26) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero((a > level).any(axis=1))[0], np.nonzero((a > level).any(axis=0))[0]
    return rows[0], rows[-1], cols[0], cols[-1]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def drawn_seven(background: int, ink: int, mode: str = "L") -> Image.Image:
    """A large "7" in the top-right corner of a 280x280 canvas, as a user draws one."""
    image = Image.new(mode, (280, 280), background)
    ImageDraw.Draw(image).line([(150, 20), (260, 20), (190, 270)], fill=ink, width=18)
    return image


def test_real_mnist_digits_are_left_as_they_are(mnist):
    images = mnist.test_images[:200, 0].numpy()
    framed = np.stack([frame_digit(a)[0] for a in images])
    # MNIST's own framing: the same pixels, give or take the resampling of a few
    assert np.abs(framed.astype(int) - images.astype(int)).mean() < 1.0
    assert np.median([np.abs(f.astype(int) - a.astype(int)).max() for f, a in zip(framed, images)]) == 0


@pytest.mark.parametrize("background, ink", [(0, 255), (255, 0), (200, 40)])
def test_a_large_off_centre_digit_is_fitted_in_20x20_and_centred_by_its_mass(background, ink):
    framed, notes = frame_digit(np.asarray(drawn_seven(background, ink)))
    assert framed.shape == (28, 28) and framed.dtype == np.uint8
    top, bottom, left, right = ink_box(framed)
    assert max(bottom - top, right - left) + 1 in (20, 21)          # the longer side fills the box
    assert abs((right - left + 1) - 20 * 128 / 268) <= 1.5          # the aspect ratio is kept: 128x268 drawn
    cy, cx = centre_of_mass(framed.astype(float))
    assert abs(cy - 14) < 0.6 and abs(cx - 14) < 0.6
    assert framed.max() == 255 and framed[0].max() == 0 and framed[:, 0].max() == 0   # bright ink on black
    assert (NOTE_INVERTED in notes) == (background > 127) and NOTE_FRAMED in notes


def test_a_blank_image_stays_blank():
    framed, notes = frame_digit(np.full((100, 80), 255, np.uint8))
    assert framed.shape == (28, 28) and framed.max() == 0


def test_prepare_image_frames_only_for_a_run_on_digits(tmp_path):
    data = png(drawn_seven(255, 0))
    digits, notes = prepare_image(data, "mnist", (1, 28, 28))
    assert torch.equal(digits[0], torch.from_numpy(frame_digit(np.asarray(drawn_seven(255, 0)))[0]))
    assert NOTE_INVERTED in notes
    plain, notes = prepare_image(data, "fashion-mnist", (1, 28, 28))     # clothes: only resized
    assert plain.shape == (1, 28, 28) and notes == [] and plain[0, 0, 0] == 255
    assert reads_digits("mnist", (1, 28, 28)) and not reads_digits("mnist", (1, 32, 32))
    # a wide photo in colour, for a grayscale model: both changes are said
    photo = Image.new("RGB", (120, 40), (200, 30, 30))
    image, notes = prepare_image(png(photo), "fashion-mnist", (1, 28, 28))
    assert any("grayscale" in n for n in notes) and any("centre-cropped from 120x40" in n for n in notes)
    _, notes = prepare_image(png(photo), "fashion-mnist", (1, 28, 28), resize="stretch")   # the run's --resize
    assert any("squashed from 120x40" in n for n in notes)
    # an RGBA canvas in gray is not "made grayscale"
    _, notes = prepare_image(png(drawn_seven(0, 255).convert("RGBA")), "mnist", (1, 28, 28))
    assert not any("grayscale" in n for n in notes)
    with pytest.raises(TrainkitError, match="not a readable image"):
        prepare_image(b"not an image" * 10, "mnist", (1, 28, 28))


@pytest.mark.parametrize("stroke", [255, 0])
def test_strokes_on_a_transparent_canvas_stay_visible(stroke):
    """White strokes on a transparent canvas (a drawing app's export) are shown over black, dark ones over white."""
    import io
    from PIL import Image, ImageDraw
    from trainkit.data.preprocess import NOTE_ON_BLACK
    image = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    ImageDraw.Draw(image).line((30, 8, 30, 52), fill=(stroke, stroke, stroke, 255), width=6)     # a "1"
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels, notes = prepare_image(buffer.getvalue(), "mnist", (1, 28, 28))
    assert pixels.max() == 255 and (pixels > 128).sum() > 20                 # the stroke is there, light on dark
    assert pixels[0, :, :5].max() == 0 and pixels[0, :, -5:].max() == 0          # and the background dark
    assert (NOTE_ON_BLACK in notes) == (stroke == 255) and (NOTE_INVERTED in notes) == (stroke == 0)
