"""`trainkit predict RUN FOLDER|FILE.csv|FILES...`: a run's model on new images: image files, folders
of them (walked, subfolders too), and the rows of pixel CSVs (as csv: reads them, a label column
ignored). Files that cannot be read are named in one line and the rest predicted. `--output` writes
a CSV (file, class, probability); `--format kaggle` Kaggle's `ImageId,Label` for a digit-recognizer
test.csv."""
from __future__ import annotations

import csv
import io
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TrainkitError

BATCH = 512           # images through the model at a time


@dataclass
class Batch:
    """What is predicted: each image's name (a path, or FILE.csv:ROW) and the image as the run's
    model takes it; (name, reason) of each file left out; each image's notes (inverted...)."""

    names: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    csv_rows: list[tuple[Path, int]] = field(default_factory=list)   # (file, row from 1) of CSV images


def gather(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files to read, in the order given (a folder's image files walked in name order), and
    (name, reason) of the files in folders that are not images. A named path that is missing, or a
    pipe or device, is one line before the model is loaded."""
    from ..data.images import IMAGE_SUFFIXES
    from ..inputs import regular_file

    files, skipped = [], []
    for path in paths:
        before = len(files) + len(skipped)
        if not path.is_dir():
            files.append(regular_file(path, "image"))    # a named pipe would block the open for ever
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(n for n in filenames if not n.startswith(".")):
                found = Path(dirpath) / name
                try:
                    regular = stat.S_ISREG(os.stat(found).st_mode)
                except OSError as exc:
                    skipped.append((str(found), exc.strerror or "cannot be read"))
                    continue
                if regular and found.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(found)
                else:
                    skipped.append((str(found), "not an image" if regular else "not a regular file"))
        if len(files) + len(skipped) == before:
            skipped.append((str(path), "a folder that holds no file"))
    return files, skipped


def read_inputs(trained, files: list[Path], skipped: list[tuple[str, str]]) -> Batch:
    """Every file prepared as the run's model takes it: an image as `serve` prepares it, a CSV's rows
    converted to the run's channels and size."""
    from ..data.csvfile import read_pixel_csv
    from ..data.dataset import convert_tensor
    from ..data.preprocess import prepare_image

    batch = Batch(skipped=list(skipped))
    c, h, w = trained.image_shape
    for path in files:
        try:
            if path.suffix.lower() == ".csv":
                rows, _ = read_pixel_csv(path)
                rows = convert_tensor(rows, c, (h, w))
                batch.images.extend(rows)
                batch.names.extend(f"{path}:{i + 1}" for i in range(len(rows)))
                batch.notes.extend([] for _ in rows)
                batch.csv_rows.extend((path, i + 1) for i in range(len(rows)))
                continue
            image, notes = prepare_image(path, trained.cfg.dataset, trained.image_shape, resize=trained.cfg.resize,
                                         deep=trained.deep)
        except TrainkitError as exc:
            batch.skipped.append((str(path), str(exc).removeprefix(str(path)).strip(" :")))
            continue
        batch.images.append(image)
        batch.names.append(str(path))
        batch.notes.append(notes)
    return batch


def report_skipped(batch: Batch) -> None:
    """The files left out, in one line; when nothing could be read, the first one's reason as the error."""
    from ..data.manifest import first_names

    if not batch.skipped:
        return
    if not batch.images:
        name, why = batch.skipped[0]
        raise TrainkitError(f"{name} {why}" if why.startswith(("is ", "was ", "does ")) else f"{name}: {why}")
    names = first_names([f"{name} ({why[:120]})" for name, why in batch.skipped])
    print(f"trainkit: warning: {len(batch.skipped)} file(s) left out, not images or not readable: {names}; "
          f"the other {len(batch.images)} image(s) predicted", file=sys.stderr, flush=True)


def probabilities(trained, images: list[torch.Tensor]) -> torch.Tensor:
    """Class probabilities (N, classes), BATCH images at a time."""
    return torch.cat([trained.probabilities(torch.stack(images[i:i + BATCH])) for i in range(0, len(images), BATCH)])


def table(batch: Batch, probs: torch.Tensor, classes: list[str], fmt: str) -> str:
    """The predictions as CSV text: file, class, probability; or Kaggle's ImageId,Label."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    top, index = probs.max(dim=1)
    if fmt == "kaggle":
        writer.writerow(["ImageId", "Label"])
        writer.writerows((row, classes[i]) for (_, row), i in zip(batch.csv_rows, index.tolist()))
    else:
        writer.writerow(["file", "class", "probability"])
        writer.writerows((name, classes[i], f"{p:.6f}") for name, i, p in zip(batch.names, index.tolist(), top.tolist()))
    return out.getvalue()


def check_kaggle(batch: Batch) -> None:
    """--format kaggle numbers the rows of one CSV: refuse anything else."""
    files = {path for path, _ in batch.csv_rows}
    if len(files) != 1 or len(batch.csv_rows) != len(batch.names):
        raise TrainkitError("--format kaggle writes ImageId,Label for the rows of one CSV file (Kaggle's test.csv); "
                            "give that file alone")


def cmd_predict(args) -> int:
    from ..data.preprocess import NOTE_FRAMED
    from ..outputs import check_output, write_output
    from .inference import _load_from_args

    if args.top < 1:
        raise TrainkitError(f"--top must be at least 1, got {args.top}")
    if args.format == "kaggle" and not args.output:
        raise TrainkitError("--format kaggle writes a submission file: give --output FILE.csv")
    output = check_output(args.output, "--output") if args.output else None      # before any work
    files, skipped = gather(args.images)
    trained = _load_from_args(args)
    batch = read_inputs(trained, files, skipped)
    if args.format == "kaggle":
        check_kaggle(batch)
    report_skipped(batch)
    probs = probabilities(trained, batch.images)
    if output is not None:
        write_output(output, table(batch, probs, trained.classes, args.format).encode(), "--output")
        print(f"Predicted {len(batch.names)} images; written to {output}")
        return 0
    k = min(args.top, len(trained.classes))
    for name, p, said in zip(batch.names, probs, batch.notes):
        values, indices = p.topk(k)
        ranked = ", ".join(f"{trained.classes[i]} {v:.1%}" for v, i in zip(values.tolist(), indices.tolist()))
        print(f"{name}: {ranked}")
        for note in said:
            if note != NOTE_FRAMED:         # framing is what every digit gets; the rest is news
                print(f"{name}: note: {note}", file=sys.stderr)
    return 0


def add_command(sub) -> None:
    from .inference import _add_model_flags

    pr = sub.add_parser("predict", help="classify images (files, folders, rows of a pixel CSV) with a run's model")
    _add_model_flags(pr)
    pr.add_argument("run_dir")
    pr.add_argument("images", nargs="+", type=Path, metavar="FOLDER|FILE.csv|FILE",
                    help="image files, folders of them (subfolders too), or CSVs of pixel rows")
    pr.add_argument("--top", type=int, default=3, help="how many classes to show (default: 3)")
    pr.add_argument("--output", help="write the predictions to this CSV file instead of printing them")
    pr.add_argument("--format", choices=["table", "kaggle"], default="table",
                    help="--output's columns: table (file, class, probability) or kaggle (ImageId,Label, "
                         "for the rows of a digit-recognizer test.csv) (default: table)")
    pr.set_defaults(func=cmd_predict)
