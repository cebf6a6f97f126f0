"""What a run's data was, so that `eval` and `--resume` can tell when it is no longer the same.

A manifest (the run folder's data.json) holds each source file's size and digest by name (image
files: a BLAKE2b of their bytes; IDX and CIFAR files: their published MD5, which every read
checks), and per split the count of images, the names of its files where images are files, and a
fingerprint of those. `changes` compares a manifest with the one of the data read now, in one line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from ..errors import TrainkitError

FILE = "data.json"       # in the run folder
SHOWN = 3                # names shown of what changed


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
                  splits: dict[str, tuple[int, list[str] | None]]) -> dict:
    """`splits`: per split, (image count, its files' names in order or None where images are not files)."""
    out = {"dataset": dataset, "files": {name: [size, d] for name, (size, d) in sorted(sources.items())},
           "splits": {}}
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
    for split in splits:
        a, b = recorded.get("splits", {}).get(split), current.get("splits", {}).get(split)
        if a is None or b is None:
            continue
        if a.get("count") != b.get("count") or a.get("fingerprint") != b.get("fingerprint"):
            return f"its {split} split holds other images ({b.get('count')} now, {a.get('count')} then)"
    return None


def read_manifest(folder: Path) -> dict | None:
    """A run folder's manifest, None when it has none (a run made before manifests)."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainkitError(f"{path} cannot be read: {exc}".splitlines()[0]) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("files"), dict):
        raise TrainkitError(f"{path} is not a trainkit data manifest")
    return saved


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
