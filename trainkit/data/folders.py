"""Image folders: one subfolder per class, images of any format Pillow reads, of any size.

Layouts: `train/` and `test/` (and optionally `val/`), each holding the class folders; or the class
folders themselves, of which a random 20% is held out for testing. Files and folders whose name
starts with "." are never classes nor images (.git, .ipynb_checkpoints, .DS_Store); a class folder's
subfolders are read too. Files that are not images (by suffix or content), or not regular files
(a FIFO would block), are left out and reported in one line, or refused with `--bad-files error`.
A class folder is read once: one that is a link leading to another class folder of its split (or
into one, or above one) is left out with a warning, so that the same images are never two classes;
a link to a folder elsewhere is read as any folder (a test/ or val/ class folder that leads to a
training one is read, and a warning says so). A class folder without an image file makes no class,
and a warning names it.

The scan and the split are made here, once, for both the in-memory path (`load_image_folder`) and
the streamed one (`trainkit.data.stream`).
"""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainkitError
from .dataset import ImageData, channel_stats
from .images import IMAGE_SUFFIXES, DeepRange, decode_image, image_info, measure_deep
from .manifest import digest, first_names
from .registry import Example, ReadOptions, nearest_route, register_dataset

TEST_FRACTION = 0.2     # of a folder without train/ and test/, held out for testing
SHOWN = 3               # bad files named in the one line that reports them


@dataclass
class FolderSplit:
    """What an image folder holds: (file, class name) items per split, sorted, and the files left
    out with the reason (`skipped`)."""

    root: Path
    train: list[tuple[Path, str]]
    test: list[tuple[Path, str]]
    val: list[tuple[Path, str]] | None
    classes: list[str]
    layout: str                                   # "train/test" or "flat"
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)     # about class folders, one line each

    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def _hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass
class Scan:
    """A folder of class folders, read: (file, class name) of every image file in each class folder
    and its subfolders, sorted; (file, reason) of each file left out; (class folder, the one it
    repeats) of each class folder left out as a link to another; the class folders without images."""

    items: list[tuple[Path, str]]
    skipped: list[tuple[Path, str]]
    repeats: list[tuple[str, str]]
    empty: list[str]
    real: dict[str, str] = field(default_factory=dict)     # each class folder's real path


def _nested(a: str, b: str) -> bool:
    """Whether real paths `a` and `b` are one folder, or one holds the other."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def _class_folders(folder: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(class folder name -> real path, (name, the class folder it repeats) of each left out): real
    folders first, then links in name order, each kept unless its real path is, holds or lies in a
    kept one's."""
    try:
        entries = [e for e in os.scandir(folder) if not _hidden(e.name) and e.is_dir()]
    except OSError as exc:
        raise TrainkitError(f"cannot read the image folder {folder}: {exc.strerror or exc}") from None
    kept, repeats = [], []
    for entry in sorted(entries, key=lambda e: (e.is_symlink(), e.name)):
        real = os.path.realpath(entry.path)
        first = next((name for name, other in kept if _nested(real, other)), None)
        if first is None:
            kept.append((entry.name, real))
        else:
            repeats.append((entry.name, first))
    return dict(sorted(kept)), sorted(repeats)


def scan(folder: Path) -> Scan:
    """The image files of a folder of class folders (`Scan`)."""
    items, skipped = [], []
    real, repeats = _class_folders(folder)
    for label in real:
        for dirpath, dirnames, filenames in os.walk(folder / label):
            dirnames[:] = sorted(d for d in dirnames if not _hidden(d))     # walked in a fixed order
            for name in filenames:
                if _hidden(name):
                    continue
                path = Path(dirpath) / name
                try:
                    mode = os.stat(path).st_mode          # before any open(): a FIFO would block it
                except OSError as exc:
                    skipped.append((path, exc.strerror or "cannot be read"))
                    continue
                if not stat.S_ISREG(mode):
                    skipped.append((path, "not a regular file"))
                elif path.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append((path, "not an image"))
                else:
                    items.append((path, label))
    found = {label for _, label in items}
    return Scan(sorted(items), skipped, repeats, [label for label in real if label not in found], real)


def _class_warnings(where: Path, scans: list[Scan], classes: list[str]) -> list[str]:
    """One line for the class folders left out as links, one for those that hold no image."""
    lines = []
    repeats = [(name, first) for one in scans for name, first in one.repeats]
    if repeats:
        shown = first_names([f"{name} (leads to {first})" for name, first in repeats], SHOWN)
        lines.append(f"trainkit: warning: {len(repeats)} class folder{'s' if len(repeats) > 1 else ''} in {where} "
                     f"lead{'' if len(repeats) > 1 else 's'} to another class folder's images through a link: "
                     f"{shown}; left out, so that the same images are not two classes")
    if len(scans) > 1:                  # train/, test/ (and val/): a held-out class folder that is a training one
        shared = [(f"{part}/{name}", f"train/{other}") for part, one in zip(("test", "val"), scans[1:])
                  for name, real in one.real.items() for other, seen in scans[0].real.items() if _nested(real, seen)]
        if shared:
            shown = first_names([f"{name} (leads to {other})" for name, other in shared], SHOWN)
            lines.append(f"trainkit: warning: {len(shared)} held-out class folder{'s' if len(shared) > 1 else ''} in "
                         f"{where} lead{'' if len(shared) > 1 else 's'} to training images through a link: {shown}"
                         f"; those images are in both splits, so their accuracy is not a held-out one")
    empty = sorted({name for one in scans for name in one.empty} - set(classes))
    if empty:
        lines.append(f"trainkit: warning: {len(empty)} class folder{'s' if len(empty) > 1 else ''} in {where} "
                     f"hold{'' if len(empty) > 1 else 's'} no image file ({first_names(empty, SHOWN)}): no class is made for "
                     f"{'them' if len(empty) > 1 else 'it'}")
    return lines


def report_warnings(warnings: list[str]) -> None:
    for line in warnings:
        print(line, file=sys.stderr, flush=True)


def split_folder(root: Path, seed: int = 0, test_fraction: float = TEST_FRACTION) -> FolderSplit:
    """The split of an image folder: root/train and root/test (and root/val) if present, else a
    random `test_fraction` of the files, drawn from `seed`, for testing."""
    if not root.is_dir():
        if root.exists():
            raise TrainkitError(f"image folder {root} is a file, not a folder: imagefolder:PATH takes the folder "
                                f"that holds the class folders (or train/ and test/); " + nearest_route(str(root)))
        raise TrainkitError(f"image folder {root} does not exist")
    val = None
    if (root / "train").is_dir() and (root / "test").is_dir():
        scans = [scan(root / "train"), scan(root / "test")] + ([scan(root / "val")] if (root / "val").is_dir() else [])
        train, test = scans[0].items, scans[1].items
        val = scans[2].items if len(scans) > 2 else None
        skipped = [bad for one in scans for bad in one.skipped]
        layout = "train/test"
    else:
        scans = [scan(root)]
        items, skipped = scans[0].items, scans[0].skipped
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(items) * test_fraction))) if len(items) > 1 else 0
        test = sorted(items[i] for i in order[:n_test])
        train = sorted(items[i] for i in order[n_test:])
        layout = "flat"
    classes = sorted({label for _, label in train + test + (val or [])})
    warnings = _class_warnings(root, scans, classes)
    if len(classes) < 2 or not train or not test:
        report_warnings(warnings)           # what was left out, before the refusal it explains
        raise TrainkitError(f"image folder {root} needs at least two class subfolders of images "
                            f"(found {len(classes)} classes, {len(train) + len(test)} images): "
                            f"class folders, or train/ and test/ holding class folders; " + nearest_route(""))
    return FolderSplit(root, train, test, val, classes, layout, skipped, warnings)


def report_skipped(root: Path, skipped: list[tuple[Path, str]], total: int, bad_files: str) -> None:
    """Files left out, in one line: a warning on stderr (`bad_files` "skip") or a TrainkitError ("error")."""
    if not skipped:
        return
    def shown(path, reason):
        try:
            path = path.relative_to(root)
        except ValueError:
            pass
        return f"{path} ({reason if len(reason) <= 120 else reason[:117] + '...'})"
    names = first_names([shown(p, r) for p, r in skipped], SHOWN)
    what = f"{len(skipped)} of {total} files in {root} are not images or could not be read: {names}"
    if bad_files == "error":
        raise TrainkitError(f"{what}; remove them, or leave them out with --bad-files skip")
    print(f"trainkit: warning: {what}; left out (--bad-files error refuses them)", file=sys.stderr, flush=True)


def relative_name(path, root: Path) -> str:
    """A file's name in a manifest: its path under the image folder, with "/" between parts."""
    return Path(os.path.relpath(path, root)).as_posix()


def file_sources(paths, root: Path) -> tuple[dict[str, tuple[int, str]], list[tuple[Path, str]]]:
    """(name -> (size, digest), unreadable) of files, each read once (the streamed path's manifest)."""
    sources, unreadable = {}, []
    for path in paths:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            unreadable.append((Path(path), exc.strerror or "cannot be read"))
            continue
        sources[relative_name(path, root)] = (len(raw), digest(raw))
    return sources, unreadable


def without_name(message, path) -> str:
    """The decoder's message (or error) without the file's name, which the report shows already."""
    return str(message).removeprefix(str(path)).strip(" :") or "cannot be read"


def folder_format(paths: list[Path]) -> tuple[tuple[int, tuple[int, int]] | None, list[tuple[Path, str]]]:
    """((channels, (H, W)), unreadable) of a folder of images from their headers only: 3 if any
    image is in colour, else 1; the most common size (the larger one on a tie); and (file, reason)
    of each file whose header cannot be read. None for the format when no header can."""
    sizes, colour, unreadable = {}, False, []
    for path in paths:
        try:
            channels, hw = image_info(path)
        except TrainkitError as exc:
            unreadable.append((Path(path), without_name(exc, Path(path))))
            continue
        colour = colour or channels == 3
        sizes[hw] = sizes.get(hw, 0) + 1
    if not sizes:
        return None, unreadable
    return ((3 if colour else 1), max(sizes, key=lambda hw: (sizes[hw], hw))), unreadable


def choose_format(root: Path, paths: list[Path], channels: int | None, size: tuple[int, int] | None):
    """(channels, size, chosen, unreadable): the asked ones, or the folder's own from `paths`' headers."""
    if channels is not None and size is not None:
        return channels, tuple(size), False, []
    found, unreadable = folder_format(paths)
    if found is None:
        raise TrainkitError(f"image folder {root}: none of its {len(paths)} image files can be read "
                            f"(first: {unreadable[0][0]}: {unreadable[0][1]})")
    return channels or found[0], tuple(size or found[1]), size is None, unreadable


def announce(root: Path, layout: str, classes: int, counts: dict[str, int], channels: int, size: tuple[int, int],
             chosen: bool, resize: str) -> None:
    """One line saying what is read: how many images of each split, in what shape."""
    parts = ", ".join(f"{n} {name}" for name, n in counts.items() if n or name != "validation")
    how = " (the most common size; --image-size sets another)" if chosen else ""
    print(f"Image folder {root} ({layout}): {parts} images, {classes} classes, read as "
          f"{'RGB' if channels == 3 else 'grayscale'} {size[0]}x{size[1]}{how}, resized by {resize}", flush=True)


def deep_rule(paths, given: DeepRange | None = None) -> DeepRange | None:
    """The dataset's rule for its 32-bit and float images: `given` (a run's), else measured on the
    training images `paths`, and said in one line when there are any."""
    if given is not None:
        return given
    deep, count = measure_deep(paths)
    if deep is not None:
        print(deep.line(count), flush=True)
    return deep


def load_image_folder(root: Path, channels: int | None = None, size: tuple[int, int] | None = None,
                      test_fraction: float = TEST_FRACTION, seed: int = 0, bad_files: str = "skip",
                      resize: str = "fit", deep: DeepRange | None = None) -> ImageData:
    """An image folder read whole into uint8 tensors, at `channels` and `size` (default: the
    folder's own: colour if any image is, the most common size); 32-bit and float images by one
    rule (`deep`, else measured on the training images: deep_rule)."""
    split = split_folder(root, seed, test_fraction)
    report_warnings(split.warnings)
    parts = {"training": split.train, "validation": split.val or [], "test": split.test}
    paths = [p for items in parts.values() for p, _ in items]
    channels, size, chosen, unreadable = choose_format(root, paths, channels, size)
    deep = deep_rule([p for p, _ in split.train], deep)
    bad = {p for p, _ in unreadable}
    index = split.index()
    sources = {}

    def stack(items):
        images = torch.empty((len(items), channels, *size), dtype=torch.uint8)   # filled in place: no copy
        keep = torch.zeros(len(items), dtype=torch.bool)
        names = []
        for i, (path, _) in enumerate(items):
            if path in bad:
                continue
            try:
                raw = path.read_bytes()         # read once: decoded, and its digest kept for the manifest
                images[i] = decode_image(raw, channels, size, resize, name=str(path), deep=deep)
            except OSError as exc:
                unreadable.append((path, exc.strerror or "cannot be read"))
                continue
            except TrainkitError as exc:        # a header that reads, pixels that do not (a truncated JPEG)
                unreadable.append((path, without_name(exc, path)))
                continue
            keep[i] = True
            names.append(relative_name(path, root))
            sources[names[-1]] = (len(raw), digest(raw))
        labels = torch.tensor([index[c] for _, c in items], dtype=torch.int64)
        return (images, labels, names) if bool(keep.all()) else (images[keep], labels[keep], names)

    read = {name: stack(items) for name, items in parts.items()}
    report_skipped(root, split.skipped + unreadable, len(paths) + len(split.skipped), bad_files)
    if not len(read["training"][1]) or not len(read["test"][1]):
        raise TrainkitError(f"image folder {root} has no readable {'training' if not len(read['training'][1]) else 'test'} images")
    announce(root, split.layout, len(split.classes), {name: len(y) for name, (_, y, _) in read.items()}, channels,
             size, chosen, resize)
    (train_x, train_y, train_n), (val_x, val_y, val_n), (test_x, test_y, test_n) = read.values()
    mean, std = channel_stats(train_x)
    val = (val_x, val_y) if split.val is not None else (None, None)
    files = {"train": train_n, "test": test_n, **({"val": val_n} if split.val is not None else {})}
    return ImageData(f"imagefolder:{root}", train_x, train_y, test_x, test_y, split.classes, mean, std, *val,
                     sources=sources, files=files, held_out_test=split.layout == "flat", deep=deep)


def _example(folder: Path) -> Example:
    """Two classes of six 30x30 gray PNGs."""
    from PIL import Image

    for label, value in (("dark", 40), ("light", 220)):
        (folder / "pics" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((30, 30), value + i, np.uint8)).save(folder / "pics" / label / f"{i}.png")
    return Example(f"imagefolder:{folder / 'pics'}", folder, (1, 30, 30))


@register_dataset("imagefolder", example=_example, streams=True, reads_size=True, arg_is_path=True)
def imagefolder(arg: str | None, data_dir: Path, options: ReadOptions) -> ImageData:
    if not arg:
        raise TrainkitError("--dataset imagefolder needs a folder: imagefolder:PATH")
    return load_image_folder(Path(arg), options.channels, options.size, seed=options.seed,
                             bad_files=options.bad_files, resize=options.resize, deep=options.deep)
