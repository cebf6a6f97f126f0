"""Files a command writes where the user says (`compare --png`, `summary --png`, `lr-find --output`,
`export --output`): one rule for all of them.

    path = check_output(args.png, "--png", picture=True)   # before any work: one line if it cannot be
    ...                                                       # written or must not be overwritten
    save_figure(fig, path, "--png")                          # rendered in memory, written atomically

Never a run folder's own files (config.json, metrics.csv, the plots, the checkpoints...), never a
checkpoint or weights file trainkit wrote, never through a symbolic link (an existing link is
refused: the user may not know what it points at), never a folder, a named pipe or a device; the
file appears whole or not at all (a temporary file in the same folder, then a rename), and a
missing folder, a read-only mount, a denied permission, a full disk or a name too long is one line.

Imports only the error type, the checkpoint module's atomic write, and the standard library
(matplotlib only when a picture's format is checked or rendered).
"""
from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path

from . import checkpoint as ckpt
from .errors import TrainkitError

# The names a run folder holds (rundir.FILES, its lock and TensorBoard folder), kept here so that
# this module needs nothing above it; tests/test_outputs.py checks that rundir.FILES is among them.
RUN_NAMES = frozenset({"config.json", "metrics.csv", "plot.png", "samples.png", "confusion.png", "mistakes.png",
                       "model.pt", "summary.txt", "last.pt", "best.pt", "data.json", "checks.csv",
                       ".trainkit.lock", "tensorboard"})
# What makes a folder a run's: its config.json, a checkpoint or the lock a running run holds.
RUN_MARKERS = ("config.json", "last.pt", "model.pt", ".trainkit.lock")
# The temporary file of an atomic write is named `.tmp-trainkit-<name>.<8 random characters>`.
_TMP_EXTRA = len(ckpt.TMP_PREFIX) + 1 + 8

_REASONS = {
    errno.ENOENT: "the folder {folder} does not exist",
    errno.ENOTDIR: "a part of its path is not a folder",
    errno.EROFS: "the folder {folder} is on a read-only file system",
    errno.EACCES: "permission denied in the folder {folder}",
    errno.EPERM: "permission denied in the folder {folder}",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENAMETOOLONG: "the name is too long for the file system",
    errno.EISDIR: "it is a folder",
    errno.ELOOP: "it is a symbolic link",
}


def reason(exc: OSError, path: Path) -> str:
    """An OSError of writing `path` in words: what the user can do something about."""
    text = _REASONS.get(exc.errno)
    if text is None:
        return exc.strerror or type(exc).__name__
    return text.format(folder=_short(path.parent))


def picture_formats() -> dict[str, str]:
    """The formats matplotlib can save a figure in: {"png": "Portable Network Graphics", ...}."""
    from matplotlib.figure import Figure

    return Figure().canvas.get_supported_filetypes()


def is_run_folder(folder: Path) -> bool:
    return any(os.path.lexists(folder / name) for name in RUN_MARKERS)


def check_output(path: str | os.PathLike, flag: str, *, picture: bool = False) -> Path:
    """`path` checked before any work is done for it; returns it as a Path. See the module's docstring.
    `picture`: the suffix must be a format matplotlib saves (the format is taken from it)."""
    path = Path(path)
    where = f"cannot write {flag} {_short(path)}"
    if not path.name or path.name in (".", ".."):
        raise TrainkitError(f"{where}: give a file name, not a folder")
    if picture:
        formats = picture_formats()
        suffix = path.suffix.lower().lstrip(".")
        if suffix not in formats:
            what = f"the extension {_short(Path('.' + suffix), 20)}" if suffix else "a name without an extension"
            raise TrainkitError(f"{where}: {what} is not a picture format; "
                                f"use one of {', '.join('.' + s for s in sorted(formats))}")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:                    # ENOTDIR, ENAMETOOLONG, EACCES on the way
        raise TrainkitError(f"{where}: {reason(exc, path)}") from None
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            raise TrainkitError(f"{where}: it is a symbolic link (to {_short(Path(os.readlink(path)))}); "
                                f"give the file itself or another name")
        if stat.S_ISDIR(info.st_mode):
            raise TrainkitError(f"{where}: it is a folder; give the file to write")
        if not stat.S_ISREG(info.st_mode):
            raise TrainkitError(f"{where}: it is not a regular file (a named pipe, a device or a socket)")
    folder = path.parent
    if path.name in RUN_NAMES and is_run_folder(folder):
        raise TrainkitError(f"{where}: {path.name} is a file of the run in {_short(folder)}; it is not "
                            f"overwritten, choose another name")
    if info is not None and ckpt.is_trainkit_file(path):
        raise TrainkitError(f"{where}: it is a trainkit checkpoint or weights file; it is not overwritten, "
                            f"choose another name")
    try:
        if not stat.S_ISDIR(os.stat(folder).st_mode):
            raise TrainkitError(f"{where}: {_short(folder)} is not a folder")
    except OSError as exc:
        raise TrainkitError(f"{where}: {reason(exc, path)}") from None
    limit = _name_max(folder) - _TMP_EXTRA
    if len(os.fsencode(path.name)) > limit:
        raise TrainkitError(f"{where}: the file name is {len(os.fsencode(path.name))} bytes long; "
                            f"at most {limit} here")
    _probe(folder, where, path)
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _probe(folder: Path, where: str, path: Path) -> None:
    """Create and delete a temporary file in `folder`: a read-only mount or a folder that cannot be
    written is found before the work, not after it (os.access says nothing useful to root)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=ckpt.TMP_PREFIX + "probe.")
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.isdir(folder):    # /proc, /sys: a folder that takes no files
            raise TrainkitError(f"{where}: files cannot be created in the folder {_short(folder)}") from None
        raise TrainkitError(f"{where}: {reason(exc, path)}") from None
    os.close(fd)
    os.unlink(tmp)


def check_folder(path: str | os.PathLike, flag: str) -> Path:
    """A folder a command will create or write in (`train --out`, `tune --out`), checked without
    creating it: every name short enough, the whole path too, nothing on the way a file."""
    path = Path(path)
    where = f"{flag} {_short(path)}"
    if len(os.fsencode(str(path.absolute()))) >= _path_max():
        raise TrainkitError(f"{where} cannot be used: the path is {len(os.fsencode(str(path.absolute())))} bytes "
                            f"long, at most {_path_max() - 1} here")
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), Path("."))
    limit = _name_max(existing)
    long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise TrainkitError(f"{where} cannot be used: the name {_short(Path(long), 40)} is {len(os.fsencode(long))} "
                            f"bytes long, at most {limit} here")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise TrainkitError(f"{where} cannot be used: {reason(exc, path)}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise TrainkitError(f"{where} is a file, not a folder; give a folder")
    return path


def make_folder(path: str | os.PathLike, flag: str) -> Path:
    """check_folder, then create it (and its parents): one line for a read-only mount, a denied
    permission or a full disk."""
    path = check_folder(path, flag)
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileNotFoundError:     # /proc, /sys: a folder that takes no new folders
            parent = next(p for p in path.parents if p.is_dir())
            raise TrainkitError(f"{flag} {_short(path)} cannot be created: folders cannot be created in "
                                f"{_short(parent)}") from None
        _probe(path, f"{flag} {_short(path)} cannot be used", path / "x")
    except OSError as exc:
        raise TrainkitError(f"{flag} {_short(path)} cannot be created: {reason(exc, path / 'x')}") from None
    return path


def _path_max() -> int:
    try:
        return os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def write_output(path: Path, data: bytes, flag: str) -> None:
    """Write `data` to `path` (checked by check_output), whole or not at all."""
    path = Path(path)
    if os.path.islink(path):      # made since check_output: the rename would replace the link, but say so
        raise TrainkitError(f"cannot write {flag} {_short(path)}: it is a symbolic link")
    try:
        ckpt.atomic_write_bytes(path, data)
    except OSError as exc:
        raise TrainkitError(f"cannot write {flag} {_short(path)}: {reason(exc, path)}; nothing was written") from None


def figure_bytes(fig, path: Path, dpi: int = 80, **savefig) -> bytes:
    """The figure rendered in `path`'s format, in memory; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=Path(path).suffix.lower().lstrip("."), dpi=dpi, **savefig)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def save_figure(fig, path: Path, flag: str, **savefig) -> None:
    write_output(path, figure_bytes(fig, path, **savefig), flag)


def _short(path: Path, limit: int = 120) -> str:
    """A path for a message: a 5,000-character path is cut, not printed whole."""
    text = str(path)
    if not text.isprintable():       # a newline in a name would make two lines of one message
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 3:]} ({len(text)} characters)"
