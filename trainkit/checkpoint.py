"""Checkpoints and weights on disk: written atomically, checksummed, loaded with weights_only=True only."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import TrainkitError

FORMAT = "trainkit-checkpoint-v1"
# Temporary files of atomic writes: `.tmp-trainkit-<name>.<random>`. Before this prefix they were
# `.tmp-<name>.<random>`; those are recognised by the names trainkit writes (remove_stale_temporaries).
TMP_PREFIX = ".tmp-trainkit-"
OLD_TMP_PREFIX = ".tmp-"
# A run folder's lock file (rundir.lock_run holds a flock on it). Named here, below both the run
# folder and the streamed loader, whose forked workers close their copies of it (stream.py).
LOCK = ".trainkit.lock"

# For the tests only: kill the process (as SIGKILL would, exit status 137) once this many atomic
# writes have been renamed into place, or, with TRAINKIT_FAULT_TORN=1, with the next one's temporary
# file written but not yet renamed. TRAINKIT_WRITE_LOG=FILE appends the name of each file written.
_FAULT_ENV, _TORN_ENV, _LOG_ENV = "TRAINKIT_FAULT_AFTER_WRITES", "TRAINKIT_FAULT_TORN", "TRAINKIT_WRITE_LOG"
_writes_done = 0


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening a folder
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: setting it to read it is not thread-safe


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a kill or a full disk never leaves a half-written `path`.

    The bytes go to a temporary file in the same folder, which is flushed and fsynced, then
    renamed onto `path` (atomic on POSIX), and the folder is fsynced so the rename is durable.
    The file gets the permissions open() would give it (mkstemp makes it private).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if _FAULT_ENV in os.environ and os.environ.get(_TORN_ENV) == "1":
            _fault_point()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    if _LOG_ENV in os.environ or _FAULT_ENV in os.environ:
        _count_write(path)


def _reset_write_count() -> None:
    global _writes_done
    _writes_done = 0


os.register_at_fork(after_in_child=_reset_write_count)    # a forked process counts its own writes


def _fault_point() -> None:
    if _writes_done >= int(os.environ[_FAULT_ENV]):
        os._exit(137)


def _count_write(path: Path) -> None:
    global _writes_done
    _writes_done += 1
    if _LOG_ENV in os.environ:
        with open(os.environ[_LOG_ENV], "a") as log:
            log.write(path.name + "\n")
    if _FAULT_ENV in os.environ and os.environ.get(_TORN_ENV) != "1":
        _fault_point()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# torch.save writes a zip archive. Its last record (the end of central directory) may carry a
# comment of up to 64 KiB that zip readers, torch.load included, skip. trainkit puts the SHA-256
# of every byte before the comment's length field there, so the file stays a plain torch file
# that any torch.load reads, and a flipped byte anywhere in it is caught on load.
CHECKSUM_TAG = b"trainkit-sha256:"
_FOOTER_LEN = len(CHECKSUM_TAG) + 64            # the comment: tag + hex digest
_EOCD_SIG = b"PK\x05\x06"                       # end of central directory; 22 bytes without a comment


def add_checksum(data: bytes) -> bytes:
    """torch.save bytes with the SHA-256 of their contents stored as the zip comment."""
    if len(data) < 22 or data[-22:-18] != _EOCD_SIG or data[-2:] != b"\0\0":
        raise ValueError("not a zip archive without a comment, as torch.save writes")
    body = data[:-2]
    footer = CHECKSUM_TAG + hashlib.sha256(body).hexdigest().encode()
    return body + len(footer).to_bytes(2, "little") + footer


def check_checksum(data: bytes, path: Path) -> bool:
    """True when `data` carries a checksum that matches; False for a file written without one
    (by trainkit before checksums, or by a plain torch.save); TrainkitError when it is damaged."""
    if not data.startswith(b"PK\x03\x04"):
        return False  # not a zip archive: torch.load decides (legacy format, or garbage)
    if data[-22:-18] == _EOCD_SIG and data[-2:] == b"\0\0":
        return False  # a zip archive ending with an empty comment: no checksum was written
    body, length, footer = data[:-_FOOTER_LEN - 2], data[-_FOOTER_LEN - 2:-_FOOTER_LEN], data[-_FOOTER_LEN:]
    expected = CHECKSUM_TAG + hashlib.sha256(body).hexdigest().encode()
    if length != _FOOTER_LEN.to_bytes(2, "little") or footer != expected:
        # Cut short, or any byte changed since it was written (the footer included).
        raise TrainkitError(f"{path} is truncated or corrupt: its contents do not match the SHA-256 "
                            f"checksum written with it (damaged on disk or in a copy); use another "
                            f"checkpoint or start again")
    return True


def checkpoint_bytes(obj: Any) -> bytes:
    """What atomic_torch_save writes: torch.save's bytes with their checksum."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return add_checksum(buffer.getvalue())


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, checkpoint_bytes(obj))


def is_temporary(name: str, names: tuple[str, ...] = ()) -> bool:
    """Whether `name` is a temporary file of trainkit's atomic writes: `.tmp-trainkit-*`, or an older
    trainkit's `.tmp-NAME.xxxxxxxx` for one of the file `names` given."""
    return name.startswith(TMP_PREFIX) or any(
        re.fullmatch(re.escape(OLD_TMP_PREFIX + known) + r"\.[A-Za-z0-9_]{8}", name) for known in names)


def remove_stale_temporaries(folder: Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporary files that a process killed while writing left in `folder` (see
    is_temporary); nothing else is deleted. Call it only while holding the folder (rundir.lock_run)."""
    stale = sorted(p for p in Path(folder).glob(OLD_TMP_PREFIX + "*")
                   if is_temporary(p.name, names) and p.is_file() and not p.is_symlink())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True of a file whose checksum (if it has one) matches;
    any failure is a TrainkitError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TrainkitError(f"checkpoint {path} does not exist")
    try:
        data = path.read_bytes()  # read once: what is checked is what is loaded
    except OSError as exc:
        raise TrainkitError(f"cannot read {path}: {exc.strerror}") from None
    check_checksum(data, path)
    try:
        with warnings.catch_warnings():  # e.g. "looks like a TorchScript archive": refused below anyway
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses a pickle that names a Python object (a GLOBAL): that is how a
        # checkpoint runs code. Any other unpickling error means damaged bytes.
        blocked = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line.upper()]
        if blocked:
            raise TrainkitError(f"{path} was refused: it asks to load Python objects, not just tensors and "
                                f"plain data, so loading it could run code ({blocked[0][:160]})") from None
        raise TrainkitError(f"{path} is truncated or corrupt and cannot be loaded; "
                            f"use another checkpoint or start again") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise TrainkitError(f"{path} is truncated or corrupt and cannot be loaded "
                            f"({type(exc).__name__}); use another checkpoint or start again") from None


# What every trainkit checkpoint holds; one without them cannot be resumed or used.
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "epoch", "history", "config")


def load_checkpoint(path: Path) -> dict:
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainkitError(f"{path} is not a trainkit checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise TrainkitError(f"{path} is an incomplete trainkit checkpoint (no {', '.join(missing)}); "
                            f"use another checkpoint or start again")
    if not isinstance(ckpt["model"], dict):
        raise TrainkitError(f"{path} does not hold model weights")
    return ckpt


def is_trainkit_file(path: Path) -> bool:
    """Whether `path` is a checkpoint or weights file that trainkit wrote, judged by its content:
    a trainkit checksum, or (files from before checksums) a checkpoint or a dict of tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
            f.seek(max(0, path.stat().st_size - _FOOTER_LEN))
            if f.read().startswith(CHECKSUM_TAG):
                return True
    except OSError:
        return False
    try:
        obj = safe_load(path)
    except TrainkitError:
        return False  # a TorchScript archive, say: not a file trainkit would load
    return isinstance(obj, dict) and (obj.get("format") == FORMAT or
                                      bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values()))


def load_weights_into(model: nn.Module, state: dict, source: str) -> None:
    """Load a state dict, explaining any mismatch layer by layer."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TrainkitError(f"{source} does not hold model weights")
    own = model.state_dict()
    problems = []
    for name in own.keys() - state.keys():
        problems.append(f"{name} missing")
    for name in state.keys() - own.keys():
        problems.append(f"{name} unexpected")
    for name in own.keys() & state.keys():
        if own[name].shape != state[name].shape:
            problems.append(f"{name}: checkpoint {tuple(state[name].shape)} vs model {tuple(own[name].shape)}")
    if problems:
        shown = "; ".join(sorted(problems)[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise TrainkitError(f"{source} does not fit the model {type(model).__name__} ({shown})")
    model.load_state_dict(state)


def save_weights(model: nn.Module, path: Path) -> None:
    """Model weights alone: .safetensors, or a torch state dict (.pt) otherwise."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(path, save(state))
    else:
        atomic_torch_save(state, path)


def load_weights(path: Path) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise TrainkitError(f"weights file {path} does not exist")
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise TrainkitError(f"{path} is truncated or corrupt ({exc})") from None
    return safe_load(path)
