"""Checkpoints and weights on disk: written atomically, loaded with weights_only=True only."""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import TrainkitError

FORMAT = "trainkit-checkpoint-v1"
TMP_PREFIX = ".tmp-"


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a kill or a full disk never leaves a half-written `path`.

    The bytes go to a temporary file in the same folder, which is flushed and fsynced, then
    renamed onto `path` (atomic on POSIX), and the folder is fsynced so the rename is durable.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX + path.name + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left by a run that was killed while writing."""
    stale = sorted(Path(folder).glob(TMP_PREFIX + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True; any failure is a TrainkitError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TrainkitError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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


def load_checkpoint(path: Path) -> dict:
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise TrainkitError(f"{path} is not a trainkit checkpoint")
    return ckpt


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
