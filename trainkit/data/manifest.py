"""What a run's data was, so that `eval` and `--resume` can tell when it is no longer the same.

A manifest (the run folder's data.json) holds each source file's size and digest by name (image
files: a BLAKE2b of their bytes; IDX and CIFAR files: their published MD5, which every read
checks), and per split the count of images, the names of its files where images are files, and a
fingerprint of those. `changes` compares a manifest with the one of the data read now, in one line. A data.json is
checked against a schema when read (`Manifest`); a run that wrote one and lost it is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import TrainkitError
from ..inputs import regular_file

FILE = "data.json"       # in the run folder
SHOWN = 3                # names shown of what changed
RECORDED = "data_json"   # config.json's key: whether the run wrote a data.json (the data was files)
# Settings added after data.json was: a config.json that holds one was written by a trainkit that
# wrote data.json too (runs made before RECORDED was); on a resume config.json is rewritten whole,
# so RunDirectory.record_config keeps RECORDED there for runs older than both.
LATER_SETTINGS = ("final", "mlflow_register")


class _Split(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    count: int = Field(ge=0)
    fingerprint: str | None = None
    files: list[str] | None = None


class Manifest(BaseModel):
    """What a data.json must hold; anything else is one line, never a traceback later on."""
    model_config = ConfigDict(strict=True, extra="ignore")
    dataset: str | None = None
    files: dict[str, tuple[int, str]]             # name -> (size, digest)
    splits: dict[str, _Split]
    classes: list[str] | None = None              # absent in data.json written before it was recorded
    deep_images: dict[str, float | int | None] | None = None   # images.DeepRange: the rule for 32-bit and float images


def digest(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def fingerprint(names: Iterable[str], sources: dict[str, tuple[int, str]]) -> str:
    """A digest of a split: its files' names, sizes and digests, in order."""
    h = hashlib.sha256()
    for name in names:
        size, file_digest = sources.get(name, (-1, ""))
        h.update(f"{name}\t{size}\t{file_digest}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def make_manifest(dataset: str, sources: dict[str, tuple[int, str]],
                  splits: dict[str, tuple[int, list[str] | None]], classes: list[str] | None = None) -> dict:
    """`splits`: per split, (image count, its files' names in order or None where images are not files)."""
    out = {"dataset": dataset, "files": {name: [size, d] for name, (size, d) in sorted(sources.items())},
           "splits": {}}
    if classes is not None:
        out["classes"] = list(classes)
    for split, (count, names) in splits.items():
        entry = {"count": count}
        if names is not None:
            entry.update(fingerprint=fingerprint(names, sources), files=list(names))
        out["splits"][split] = entry
    return out


def first_names(names: list[str], limit: int = SHOWN) -> str:
    """The first `limit` of `names`, and how many more: what a one-line warning or error names."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def changes(recorded: dict, current: dict, splits: Iterable[str]) -> str | None:
    """What differs between two manifests, in one line (None: the same data): files added,
    removed or modified, else a split of `splits` that holds other images."""
    old, new = recorded.get("files", {}), current.get("files", {})
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    modified = sorted(n for n in old.keys() & new.keys() if list(old[n]) != list(new[n]))
    if added or removed or modified:
        parts = [f"{len(names)} {what}" + (f" ({first_names(names)})" if names else "")
                 for what, names in (("added", added), ("removed", removed), ("modified", modified))]
        return "files " + ", ".join(parts)
    then, now = recorded_classes(recorded), current.get("classes")
    if then is not None and now is not None and list(then) != list(now):
        return f"its classes are {first_names(list(now))} now, {first_names(then)} then"
    for split in splits:
        a, b = recorded.get("splits", {}).get(split), current.get("splits", {}).get(split)
        if a is None or b is None:
            continue
        if a.get("count") != b.get("count") or a.get("fingerprint") != b.get("fingerprint"):
            return f"its {split} split holds other images ({b.get('count')} now, {a.get('count')} then)"
    return None


def read_manifest(folder: Path) -> dict | None:
    """A run folder's manifest, its structure checked; None when the run was made before
    manifests. A run that wrote one and has none now (deleted, or a folder or a pipe in its
    place) is refused: read as an old run, a flat folder would be split again from another seed."""
    path = Path(folder) / FILE
    if not os.path.lexists(path):
        if records_data(Path(folder)):
            raise TrainkitError(f"{folder} has lost its {FILE}, which the run wrote: what it trained and tested on "
                                f"cannot be known (a flat folder's split would be drawn anew); put {FILE} back "
                                f"from a copy of the run, or train a new run")
        return None
    try:
        raw = regular_file(path, "the run's data record").read_bytes()
        return Manifest.model_validate_json(raw).model_dump()
    except OSError as exc:
        raise TrainkitError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "the file"
        raise TrainkitError(f"{path} is not a trainkit data manifest ({where}: {first['msg']})".splitlines()[0]) \
            from None


def recorded_classes(recorded: dict) -> list[str] | None:
    """The class names a manifest records: its own list, else (a data.json written before it held
    one) an image folder's class folders, the parent folder of each file named, sorted as
    folders.split_folder orders them. None where it records neither."""
    if recorded.get("classes") is not None:
        return list(recorded["classes"])
    if not str(recorded.get("dataset") or "").startswith("imagefolder:"):
        return None
    parents = {name.split("/")[-2] for split in recorded.get("splits", {}).values()
               for name in split.get("files") or () if "/" in name}
    return sorted(parents) or None


def check_classes(folder: Path, classes: list[str], doing: str) -> None:
    """Refuse, in one line, class names (config.json's, which predict and eval name classes by)
    other than the ones the run's data.json records: an edited list would name every class wrongly."""
    if not os.path.lexists(Path(folder) / FILE):
        return                                  # nothing recorded (read_manifest says why where it matters)
    recorded = read_manifest(folder)
    expected = recorded_classes(recorded) if recorded is not None else None
    if expected is not None and list(classes) != expected:
        raise TrainkitError(f"{Path(folder) / 'config.json'} names the classes {first_names(list(classes))}, but the "
                            f"run's {FILE} records {first_names(expected)}: config.json was changed; {doing} "
                            f"refuses to name classes other than the ones the run learnt")


def records_data(folder: Path) -> bool:
    """Whether the run in `folder` was made by a trainkit that writes data.json for data read
    from files: its config.json says so, or holds a setting added after data.json was. A
    config.json that cannot be read says no here (the command that loads it says why)."""
    try:
        saved = json.loads(regular_file(folder / "config.json", "the run's settings").read_bytes())
    except (TrainkitError, OSError, ValueError, RecursionError):
        return False
    if not isinstance(saved, dict):
        return False
    if RECORDED in saved:
        return saved[RECORDED] is True
    settings = saved.get("config")
    return isinstance(settings, dict) and not str(settings.get("dataset", "")).startswith("python:") \
        and any(name in settings for name in LATER_SETTINGS)


def check_same_data(folder: Path, current: dict | None, splits: Iterable[str], doing: str) -> None:
    """Refuse, in one line, data that is not what the run in `folder` recorded (`doing`: "eval",
    "--resume"). Nothing to check without a manifest on either side."""
    recorded = read_manifest(folder)
    if recorded is None or current is None:
        return
    what = changes(recorded, current, splits)
    if what is not None:
        raise TrainkitError(f"the data of {current.get('dataset')} is not what {folder} was trained on: {what}; "
                            f"{doing} refuses to use different data as the same")
