"""trainkit.data.images: every format, bit depth, orientation and transparency a user's files come
in, written here with Pillow and decoded from their paths and their bytes; and every file a user can
get wrong (missing, a FIFO, truncated, not an image, a decompression bomb) as one line."""

import gzip
import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainkit.data.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_image, image_info
from trainkit.errors import TrainkitError


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixels(tensor) -> np.ndarray:
    """(C, H, W) uint8 tensor -> (H, W) for one channel, (H, W, C) for three."""
    array = tensor.numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def decode_both(tmp_path: Path, data: bytes, suffix: str, channels: int, size, **options) -> np.ndarray:
    """Decoded from a file and from the same bytes: the two must agree."""
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    from_path = decode_image(path, channels, size, **options)
    from_bytes = decode_image(data, channels, size, **options)
    assert from_path.dtype == from_bytes.dtype == __import__("torch").uint8
    assert from_path.shape == (channels, *size)
    assert from_path.equal(from_bytes)
    assert decode_image(str(path), channels, size, **options).equal(from_path)
    return pixels(from_path)


def grey_pattern(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def colour_pattern(h: int = 24, w: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def mnist_digits(data_dir: Path, n: int = 5) -> np.ndarray:
    """The first n MNIST test digits, (n, 28, 28) uint8, read from the IDX file itself."""
    raw = data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    opener = (lambda: raw.open("rb")) if raw.is_file() else (lambda: gzip.open(raw.with_suffix(".gz")))
    with opener() as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        assert (magic, rows, cols) == (2051, 28, 28)
        return np.frombuffer(f.read(n * 28 * 28), np.uint8).reshape(n, 28, 28)


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(TrainkitError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Formats and bit depths

def test_suffixes_cover_every_format_read():
    for suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"):
        assert suffix in IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


@pytest.mark.parametrize("fmt, suffix, options", [("PNG", ".png", {}), ("WEBP", ".webp", {"lossless": True}),
                                                  ("BMP", ".bmp", {}), ("TIFF", ".tif", {}), ("PPM", ".pgm", {})])
def test_lossless_greyscale_is_exact(tmp_path, fmt, suffix, options):
    grey = grey_pattern()
    got = decode_both(tmp_path, encode(Image.fromarray(grey), fmt, **options), suffix, 1, grey.shape)
    assert np.array_equal(got, grey)
    assert image_info(tmp_path / f"image{suffix}") == ((3 if fmt == "WEBP" else 1), grey.shape)  # WebP has no grey


@pytest.mark.parametrize("fmt, suffix, options", [("PNG", ".png", {}), ("WEBP", ".webp", {"lossless": True}),
                                                  ("BMP", ".bmp", {}), ("TIFF", ".tiff", {}), ("PPM", ".ppm", {})])
def test_lossless_colour_is_exact_and_its_grey_is_pillows_L(tmp_path, fmt, suffix, options):
    rgb = colour_pattern()
    data = encode(Image.fromarray(rgb), fmt, **options)
    assert np.array_equal(decode_both(tmp_path, data, suffix, 3, rgb.shape[:2]), rgb)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))              # ITU-R 601-2, as before
    assert np.array_equal(decode_both(tmp_path, data, suffix, 1, rgb.shape[:2]), grey)
    assert image_info(tmp_path / f"image{suffix}") == (3, rgb.shape[:2])


def test_jpeg_is_decoded_as_pillow_decodes_it(tmp_path):
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, 255 - x * 5], -1).astype(np.uint8)     # smooth: JPEG keeps it
    data = encode(Image.fromarray(rgb), "JPEG", quality=95)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decode_both(tmp_path, data, ".jpg", 3, (32, 48)), expected)
    assert np.abs(expected.astype(int) - rgb).mean() < 4           # and that is close to what was saved


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_by_its_depth_not_binarised(tmp_path, fmt):
    values = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)   # 0 .. 65195
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    got = decode_both(tmp_path, encode(image, fmt), ".png" if fmt == "PNG" else ".tif", 1, values.shape)
    assert np.array_equal(got, np.rint(values / 257).astype(np.uint8))
    assert len(np.unique(got)) > 200                                  # today's decoder gives two levels
    assert image_info(tmp_path / ("image.png" if fmt == "PNG" else "image.tif")) == (1, values.shape)
    # the same image in three channels: three equal ones
    colour = decode_image(tmp_path / ("image.png" if fmt == "PNG" else "image.tif"), 3, values.shape)
    assert all(np.array_equal(colour[c].numpy(), got) for c in range(3))


def test_16_bit_pgm_and_float_tiff_are_scaled(tmp_path):
    values = np.array([[0, 1023, 512, 256]], dtype=">u2")                # a 10-bit PGM: maxval 1023
    got = decode_both(tmp_path, b"P5\n4 1\n1023\n" + values.tobytes(), ".pgm", 1, (1, 4))
    assert np.abs(got.astype(int) - np.rint(values.astype(float) * 255 / 1023)).max() <= 1
    floats = np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32)
    got = decode_both(tmp_path, encode(Image.fromarray(floats, "F"), "TIFF"), ".tif", 1, floats.shape)
    assert np.array_equal(got, np.rint(floats * 255).astype(np.uint8))


@pytest.mark.parametrize("top, divisor", [(252, 1), (65000, 257), (2_000_000_000, (2**31 - 1) / 255)])
def test_32_bit_integer_tiff_is_scaled_by_the_range_of_its_values(tmp_path, top, divisor):
    # mode "I", 32 bits a sample: values up to 255 are 8-bit ones, up to 65535 16-bit ones, beyond
    # that the 32-bit range (a 0-255 image used to come out black)
    values = np.linspace(0, top, 24 * 32).reshape(24, 32).astype(np.int32)
    image = Image.fromarray(values, "I")
    data = encode(image, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I" and Image.open(io.BytesIO(data)).tag_v2[258] in (32, (32,))
    got = decode_both(tmp_path, data, ".tif", 1, values.shape)
    assert np.abs(got.astype(float) - values / divisor).max() <= 0.5 + 1e-9
    assert got.max() == round(top / divisor) > 230                    # bright, where it was black
    negative = values.copy()
    negative[0, :4] = -5                                              # signed: below 0 reads as 0
    assert (decode_image(encode(Image.fromarray(negative, "I"), "TIFF"), 1, values.shape)[0, 0, :4] == 0).all()


def test_16_bit_and_float_images_are_scaled_by_their_range(tmp_path):
    # a 16-bit PGM (PPM's "I") of small values is a dark 16-bit image, not 8-bit values
    dark = np.array([[0, 100, 255, 200]], dtype=">u2")
    got = decode_both(tmp_path, b"P5\n4 1\n65535\n" + dark.tobytes(), ".pgm", 1, (1, 4))
    assert np.array_equal(got, np.rint(dark / 257).astype(np.uint8))
    # an I;16 TIFF: / 257
    sixteen = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    got = decode_both(tmp_path, encode(Image.fromarray(sixteen), "TIFF"), ".tif", 1, (1, 4))
    assert np.array_equal(got, [[0, 1, 255, 128]])
    # floats: [0, 1] * 255; up to 255 as they are; beyond, as 16-bit values; NaN and below 0 as 0
    for floats, expected in (([0.0, 0.5, 1.0, 0.25], [0, 128, 255, 64]),
                             ([0.0, 3.0, 254.6, 100.0], [0, 3, 255, 100]),
                             ([0.0, 65535.0, 1e9, 32896.0], [0, 255, 255, 128]),
                             ([np.nan, -4.0, 0.5, 200.0], [0, 0, 0, 200])):
        image = Image.fromarray(np.array([floats], dtype=np.float32), "F")
        got = decode_both(tmp_path, encode(image, "TIFF"), ".tif", 1, (1, 4))
        assert got.tolist() == [expected], floats


def test_16_bit_rgb_png_keeps_its_colours(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rgb16 = np.array([[[65535, 0, 0], [0, 65535, 0]], [[0, 0, 65535], [32896, 32896, 32896]]], dtype=">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in rgb16)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    got = decode_both(tmp_path, data, ".png", 3, (2, 2))
    assert np.array_equal(got, np.rint(rgb16 / 257).astype(np.uint8))


def test_a_16_bit_mnist_digit_decodes_as_its_8_bit_png(tmp_path, mnist_dir):
    for i, digit in enumerate(mnist_digits(mnist_dir)):
        eight = decode_image(encode(Image.fromarray(digit), "PNG"), 1, (28, 28))
        assert np.array_equal(pixels(eight), digit)
        for wide in (digit.astype(np.uint16) * 257, digit.astype(np.uint16) << 8):   # both common ways to widen
            path = tmp_path / f"digit{i}-16.png"
            Image.fromarray(wide).save(path)
            assert Image.open(path).mode == "I;16"
            sixteen = pixels(decode_image(path, 1, (28, 28)))
            assert np.abs(sixteen.astype(int) - digit).max() <= 1
            # and resized for a larger model, both give the same pixels within 1
            resized = decode_image(encode(Image.fromarray(digit), "PNG"), 1, (32, 32)).numpy().astype(int)
            assert np.abs(decode_image(path, 1, (32, 32)).numpy().astype(int) - resized).max() <= 1


def test_palette_images_are_converted_through_their_palette(tmp_path):
    rgb = colour_pattern(16, 16)
    palette = Image.fromarray(rgb).quantize(32)
    data = encode(palette, "PNG")
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(decode_both(tmp_path, data, ".png", 3, (16, 16)), expected)
    assert np.array_equal(decode_both(tmp_path, data, ".png", 1, (16, 16)), np.asarray(palette.convert("L")))
    grey_palette = Image.fromarray(grey_pattern(16, 16)).convert("P")
    (tmp_path / "grey.png").write_bytes(encode(grey_palette, "PNG"))
    assert image_info(tmp_path / "grey.png")[0] == 1


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("L", (20, 12), v) for v in (30, 200, 90)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 3
    assert np.all(pixels(decode_image(path, 1, (12, 20))) == 30)
    assert image_info(path) == (1, (12, 20))
    multipage = tmp_path / "pages.tif"
    frames[1].save(multipage, save_all=True, append_images=[frames[2]])
    assert np.all(pixels(decode_image(multipage, 1, (12, 20))) == 200)


# ---------------------------------------------------------------------------------------------
# Transparency: composited over white, as a viewer shows it

def black_digit_alpha(h: int = 28, w: int = 28) -> np.ndarray:
    """A black '1' where alpha is 255, transparent elsewhere; one half-transparent column."""
    alpha = np.zeros((h, w), np.uint8)
    alpha[4:24, 12:16] = 255
    alpha[4:24, 20] = 128
    return alpha


def expected_over_white(alpha: np.ndarray) -> np.ndarray:
    return (255 - alpha).astype(np.uint8)            # black (0) over white (255) by alpha, rounded


def test_rgba_black_digit_on_transparent_is_a_black_digit_on_white(tmp_path):
    alpha = black_digit_alpha()
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = alpha
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    got = decode_both(tmp_path, data, ".png", 1, (28, 28))
    assert np.abs(got.astype(int) - expected_over_white(alpha)).max() <= 1
    assert got[0, 0] == 255 and got[10, 13] == 0                       # white background, black stroke
    colour = decode_both(tmp_path, data, ".png", 3, (28, 28))
    assert all(np.array_equal(colour[..., c], got) for c in range(3))
    assert image_info(tmp_path / "image.png") == (3, (28, 28))
    # an opaque RGBA image is its RGB, as before
    rgba[..., 3] = 255
    rgba[..., :3] = colour_pattern(28, 28)
    assert np.array_equal(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), 3, (28, 28)).numpy(),
                          rgba[..., :3].transpose(2, 0, 1))


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("WEBP", ".webp"), ("TIFF", ".tif")])
def test_la_transparency_is_composited(tmp_path, fmt, suffix):
    alpha = black_digit_alpha()
    la = np.stack([np.zeros((28, 28), np.uint8), alpha], -1)
    options = {"lossless": True} if fmt == "WEBP" else {}
    got = decode_both(tmp_path, encode(Image.fromarray(la, "LA"), fmt, **options), suffix, 1, (28, 28))
    assert np.abs(got.astype(int) - expected_over_white(alpha)).max() <= 1


def test_palette_and_colour_key_transparency_are_composited(tmp_path):
    alpha = black_digit_alpha()
    indices = np.where(alpha == 255, 1, 0).astype(np.uint8)            # 0: transparent red, 1: black
    palette = Image.fromarray(indices, "P")
    palette.putpalette([255, 0, 0, 0, 0, 0])
    got = decode_both(tmp_path, encode(palette, "PNG", transparency=0), ".png", 1, (28, 28))
    assert np.array_equal(got, np.where(alpha == 255, 0, 255))         # the red background is not shown
    got = decode_both(tmp_path, encode(palette, "GIF", transparency=0), ".gif", 3, (28, 28))
    assert np.array_equal(got[..., 0], np.where(alpha == 255, 0, 255))
    # a tRNS colour key in an RGB and in an L PNG: pixels of that colour are clear
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[alpha != 255] = (0, 0, 200)
    got = decode_both(tmp_path, encode(Image.fromarray(rgb), "PNG", transparency=(0, 0, 200)), ".png", 3, (28, 28))
    assert np.array_equal(got, np.repeat(np.where(alpha == 255, 0, 255)[..., None], 3, -1))
    grey = np.where(alpha == 255, 0, 50).astype(np.uint8)
    got = decode_both(tmp_path, encode(Image.fromarray(grey), "PNG", transparency=50), ".png", 1, (28, 28))
    assert np.array_equal(got, np.where(alpha == 255, 0, 255))
    wide = np.where(alpha == 255, 0, 1000).astype(np.uint16)           # and in a 16-bit one
    got = decode_both(tmp_path, encode(Image.fromarray(wide), "PNG", transparency=1000), ".png", 1, (28, 28))
    assert np.array_equal(got, np.where(alpha == 255, 0, 255))


# ---------------------------------------------------------------------------------------------
# EXIF orientation

def quadrants(h: int = 32, w: int = 48) -> np.ndarray:
    """Four flat grey blocks (JPEG keeps them), so any turn or mirror shows."""
    upright = np.zeros((h, w), np.uint8)
    upright[: h // 2, w // 2:] = 80
    upright[h // 2:, : w // 2] = 160
    upright[h // 2:, w // 2:] = 240
    return upright


# How each orientation stores an upright picture, from the EXIF spec: 6 is shown turned 90 degrees
# clockwise, so it is stored turned counter-clockwise; 8 the other way; 3 upside down.
STORED = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1),
          2: lambda a: a[:, ::-1], 5: lambda a: a.T}


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    upright = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED[orientation](upright))
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    assert image_info(path) == (1, upright.shape)                     # from the header: as shown
    got = pixels(decode_image(path, 1, upright.shape))
    assert np.abs(got.astype(int) - upright).mean() < 3
    assert np.abs(got[2:-2, 2:-2].astype(int) - upright[2:-2, 2:-2]).max() < 12   # block edges ring in a JPEG
    colour = decode_image(path, 3, upright.shape)
    assert np.abs(pixels(colour)[..., 1].astype(int) - upright).mean() < 3


@pytest.mark.parametrize("orientation", [2, 5, 6])
def test_png_exif_orientation_is_applied_exactly(tmp_path, orientation):
    upright = grey_pattern(20, 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED[orientation](upright))
    got = decode_both(tmp_path, encode(Image.fromarray(stored), "PNG", exif=exif), ".png", 1, upright.shape)
    assert np.array_equal(got, upright)
    assert image_info(tmp_path / "image.png") == (1, upright.shape)


# ---------------------------------------------------------------------------------------------
# Resizing: fit (shorter side, centre crop) by default, stretch on request

def test_fit_crops_the_centre_and_stretch_keeps_everything(tmp_path):
    wide = np.full((40, 80), 200, np.uint8)
    wide[:, :20] = wide[:, 60:] = 0                                   # black bars outside the centre square
    wide[:, 39:41] = 255                                              # a line at the very centre
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    fit = pixels(decode_image(path, 1, (20, 20)))
    stretch = pixels(decode_image(path, 1, (20, 20), resize="stretch"))
    # no bar left: the centre 40 x 40 only (the filter's reach at its edges just touches the bars)
    assert np.all(fit[:, 1:-1] >= 190) and np.all(fit[:, [0, -1]] > 150)
    assert np.all(fit[:, 9:11] > 220) and np.all(fit[:, 1:8] == 200)   # the centre line stays in the centre
    assert np.all(stretch[:, 0] < 10) and np.all(stretch[:, -1] < 10)   # the bars squeezed in
    expected = np.asarray(Image.fromarray(wide).resize((20, 20), Image.BILINEAR))
    assert np.array_equal(stretch, expected)                          # stretch is the old conversion
    assert np.array_equal(pixels(decode_image(path, 1, (20, 20))), fit)    # "fit" is the default
    # a tall image: the middle rows are kept
    tall = np.ascontiguousarray(wide.T)
    fit_tall = pixels(decode_image(encode(Image.fromarray(tall), "PNG"), 1, (20, 20)))
    assert np.array_equal(fit_tall, fit.T)
    # a target that is not square: 40 x 80 into 30 x 30 keeps the middle 40 columns as well
    assert np.all(pixels(decode_image(path, 1, (30, 30)))[:, 1:-1] >= 190)


def test_same_aspect_ratio_or_same_size_is_the_old_conversion(tmp_path):
    rgb = colour_pattern(40, 60)
    path = tmp_path / "c.png"
    Image.fromarray(rgb).save(path)
    for size in [(20, 30), (80, 120), (40, 60)]:
        expected = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BILINEAR))
        for resize in ("fit", "stretch"):
            assert np.array_equal(pixels(decode_image(path, 3, size, resize=resize)), expected)
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((30, 20), Image.BILINEAR))
    assert np.array_equal(pixels(decode_image(path, 1, (20, 30))), grey)


def test_bad_arguments_are_one_line():
    data = encode(Image.new("L", (4, 4)), "PNG")
    one_line_error(lambda: decode_image(data, 1, (4, 4), resize="squash"), "resize must be one of fit, stretch")
    one_line_error(lambda: decode_image(data, 2, (4, 4)), "1 or 3 channels")
    one_line_error(lambda: decode_image(data, 1, (0, 4)), "two positive integers")
    one_line_error(lambda: decode_image(data, 1, (4, 4, 4)), "two positive integers")
    assert decode_image(data, 1, [np.int64(4), 4]).shape == (1, 4, 4)


# ---------------------------------------------------------------------------------------------
# Files a user can get wrong: one line naming the file, never a hang or a traceback

def test_a_missing_file_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "nope.png"
    message = one_line_error(lambda: decode_image(missing, 1, (28, 28)), f"{missing} does not exist")
    assert "readable" not in message
    one_line_error(lambda: image_info(missing), f"{missing} does not exist")
    one_line_error(lambda: decode_image(tmp_path / "file.png" / "x.png", 1, (28, 28)), "does not exist")


def test_a_folder_or_a_device_is_not_an_image(tmp_path):
    one_line_error(lambda: decode_image(tmp_path, 1, (28, 28)), f"{tmp_path} is a folder")
    if os.path.exists("/dev/zero"):              # a device reads zeros forever: refused, not read
        one_line_error(lambda: decode_image("/dev/zero", 1, (28, 28)), "/dev/zero is not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_fifo_is_one_line_at_once_never_a_hang(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = {}

    def call(function):
        try:
            function()
        except TrainkitError as exc:
            outcome[function] = exc

    for function in (lambda: decode_image(fifo, 1, (28, 28)), lambda: image_info(fifo)):
        # a thread with a deadline: an open() blocked on the FIFO fails the test instead of hanging it
        thread = threading.Thread(target=call, args=(function,), daemon=True)
        start = time.monotonic()
        thread.start()
        thread.join(10)
        if thread.is_alive():                   # unblock it (a writer arrives) before failing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("decoding a FIFO blocked")
        assert time.monotonic() - start < 5
        message = str(outcome[function])
        assert "\n" not in message and f"{fifo} is not a regular file" in message, message


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("TIFF", ".tif")])
def test_a_truncated_file_is_one_line_naming_it(tmp_path, fmt, suffix):
    data = encode(Image.fromarray(colour_pattern(64, 64)), fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    one_line_error(lambda: decode_image(path, 3, (32, 32)), f"{path} is not a readable image")
    one_line_error(lambda: decode_image(data[: len(data) // 2], 3, (32, 32), name="upload.bin"),
                   "upload.bin is not a readable image")


def test_a_file_that_is_not_an_image_is_one_line(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello, not a picture\n" * 20)
    one_line_error(lambda: decode_image(text, 1, (28, 28)), f"{text} is not a readable image", "PNG, JPEG")
    one_line_error(lambda: image_info(text), f"{text} is not a readable image")
    one_line_error(lambda: decode_image(b"hello" * 10, 1, (28, 28)), "the image is not a readable image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    one_line_error(lambda: decode_image(empty, 1, (28, 28)), f"{empty} is empty")
    one_line_error(lambda: decode_image(b"", 1, (28, 28), name="upload"), "upload is empty")
    # an EPS is an image Pillow knows (through Ghostscript), but not one trainkit reads
    one_line_error(lambda: decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 1, (4, 4)),
                   "not a readable image")


def png_bomb(side: int) -> bytes:
    """A valid black 1-bit PNG of side x side pixels: a few kB that decode to side**2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 14_000])    # in Pillow's warning zone, and above where it raises
def test_a_decompression_bomb_is_refused_quoting_trainkits_limit(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(side))
    start = time.perf_counter()
    message = one_line_error(lambda: decode_image(path, 1, (28, 28)),
                             f"{path} was refused: Image size ({side * side} pixels) exceeds limit of "
                             f"{MAX_PIXELS:,} pixels", "decompression bomb")
    assert "178956970" not in message and "178,956,970" not in message     # not Pillow's number
    one_line_error(lambda: image_info(path), "was refused", f"{MAX_PIXELS:,}")
    # serve's own, lower limit, from the bytes
    one_line_error(lambda: decode_image(path.read_bytes(), 1, (28, 28), name="up.png", max_pixels=4096 * 4096),
                   f"up.png was refused: Image size ({side * side} pixels) exceeds limit of 16,777,216 pixels")
    assert time.perf_counter() - start < 3                # refused from the header, nothing decoded
    # just under the limit, an image is read
    assert decode_image(png_bomb(64), 1, (8, 8), max_pixels=64 * 64).shape == (1, 8, 8)
