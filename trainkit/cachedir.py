"""Where trainkit keeps what it makes for itself on this machine, apart from any run: the measured
device choices (devices.py) and the image caches of streamed folders (stream.py)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$TRAINKIT_CACHE_DIR, else $XDG_CACHE_HOME/trainkit, else ~/.cache/trainkit."""
    if os.environ.get("TRAINKIT_CACHE_DIR"):
        return Path(os.environ["TRAINKIT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainkit"
