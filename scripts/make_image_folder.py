"""Write a synthetic but learnable image folder: PATH/<class>/<n>.png, one subfolder per class.

    python scripts/make_image_folder.py /tmp/folder --count 200000 --size 64 --classes 10 [--workers N]

Each class has its own shape (a disc, a square, a bar, a ring... at a random place and scale) in
its own hue, on a random background with noise, so a small network learns it but not at a glance.
The files are written by --workers processes (default: every core); the same arguments always
write the same pixels (each image is drawn from its own seed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("disc", "square", "hbar", "vbar", "ring", "cross", "triangle", "diamond")


def draw(index: int, size: int, classes: int, seed: int) -> tuple[int, np.ndarray]:
    """(label, (size, size, 3) uint8) of image `index`."""
    rng = np.random.default_rng([seed, index])
    label = index % classes
    shape = SHAPES[label % len(SHAPES)]
    hue = np.array([np.cos(2 * np.pi * (label / classes + k / 3)) for k in range(3)]) * 0.5 + 0.5   # (3,)
    background = rng.uniform(0, 1, 3) * 0.6
    image = np.broadcast_to(background, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.12, 0.28)
    dy, dx = yy - cy, xx - cx
    mask = {"disc": dy**2 + dx**2 < r**2,
            "square": (abs(dy) < r * 0.8) & (abs(dx) < r * 0.8),
            "hbar": (abs(dy) < r * 0.3) & (abs(dx) < r * 1.3),
            "vbar": (abs(dx) < r * 0.3) & (abs(dy) < r * 1.3),
            "ring": abs(np.sqrt(dy**2 + dx**2) - r) < r * 0.25,
            "cross": ((abs(dy) < r * 0.25) | (abs(dx) < r * 0.25)) & (abs(dy) < r) & (abs(dx) < r),
            "triangle": (dy > -r) & (dy < r) & (abs(dx) < (dy + r) / 2),
            "diamond": abs(dy) + abs(dx) < r}[shape]
    image[mask] = hue * rng.uniform(0.7, 1.0)
    image += rng.normal(0, 0.08, image.shape)
    return label, (image.clip(0, 1) * 255).astype(np.uint8)


def write_range(root: str, start: int, stop: int, size: int, classes: int, seed: int) -> int:
    for index in range(start, stop):
        label, pixels = draw(index, size, classes, seed)
        # compress_level 1: a few times faster to write than the default, and read as fast
        Image.fromarray(pixels).save(Path(root) / f"class{label:02d}" / f"{index:07d}.png", compress_level=1)
    return stop - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--count", type=int, default=20000, help="images in all (default 20000)")
    parser.add_argument("--size", type=int, default=64, help="side in pixels (default 64)")
    parser.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if args.count < 2 or args.size < 8 or not 2 <= args.classes <= args.count or args.workers < 1:
        print("make_image_folder: error: needs --count >= 2, --size >= 8, 2 <= --classes <= --count, "
              "--workers >= 1", file=sys.stderr)
        return 2
    root = Path(args.path)
    for label in range(args.classes):
        (root / f"class{label:02d}").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunk = 2000
    ranges = [(i, min(i + chunk, args.count)) for i in range(0, args.count, chunk)]
    with ProcessPoolExecutor(args.workers) as pool:
        done = sum(pool.map(write_range, *zip(*[(str(root), a, b, args.size, args.classes, args.seed)
                                                 for a, b in ranges])))
    seconds = time.perf_counter() - start
    print(f"wrote {done} images of {args.size}x{args.size} in {args.classes} classes to {root} "
          f"in {seconds:.1f} s ({done / seconds:.0f} images/s, {args.workers} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
