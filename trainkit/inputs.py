"""Files a command reads where the user says (images to predict, config files): only regular
files are opened. Opening a named pipe blocks until something writes to it (for ever, and
SIGTERM does not end the wait), and a device such as /dev/zero never ends; both are one line,
decided from `os.stat` before any `open`. Imports only the error type and the standard library."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import TrainkitError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` if it is a regular file (or a link to one); else TrainkitError naming `what` it was for."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise TrainkitError(f"{what} {path} does not exist") from None
    except OSError as exc:          # a name too long, a file in the way of a folder, permission
        raise TrainkitError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise TrainkitError(f"{what} {path} is {kind}, not a file; it is not opened")
    return path
