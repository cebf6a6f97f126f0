"""Getting data files onto the disk: find them, download them, check their MD5, take them out
of an archive. Knows no data format: what a file holds is the formats' and the sources' business.

Nothing is ever written into a folder that already holds the files, so a read-only data folder
works; a file appears under its final name only once it is complete and checked.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import os
import shutil
import signal
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable

from ..errors import TrainkitError

DOWNLOAD_TIMEOUT = 120.0   # seconds for one file, all mirrors together ($TRAINKIT_DOWNLOAD_TIMEOUT)
SOCKET_TIMEOUT = 20.0      # seconds one connect or read may block


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def file_md5(path: Path) -> str:
    """The MD5 of a file read in blocks (an archive of hundreds of MB is never held whole)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find(candidates: Iterable[Path]) -> Path | None:
    """The first of `candidates` that is a file."""
    return next((p for p in candidates if p.is_file()), None)


def read_limited(path: Path, limit: int, too_large: str) -> bytes:
    """A file's bytes, refused before it is read when larger than `limit` bytes (`too_large`:
    the message, after "{path} is too large ({size} bytes"), or one line when it cannot be read."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):     # a named pipe would block open() for ever
            raise TrainkitError(f"{path} is not a regular file (a folder, a named pipe, a socket or a device)")
        size = info.st_size
        if size > limit:
            raise TrainkitError(f"{path} is too large ({size} bytes{too_large}")
        return path.read_bytes()
    except OSError as exc:
        raise TrainkitError(f"cannot read {path}: {exc.strerror}") from None


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress at most `limit + 1` bytes: a file that expands further is not the one expected,
    and this finds out without allocating what a gzip bomb expands to."""
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        return f.read(limit + 1)


def write_new_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".extract-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def extract_tar(archive: Path, wanted: set[str], dest: Path) -> None:
    """Take the members named in `wanted` out of a .tar.gz (nothing else: no links, no other
    paths) into the folder `dest`, flat, through a temporary folder renamed into place once complete."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name in wanted:
                    (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        os.replace(tmp, dest)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        raise TrainkitError(f"could not extract {archive} into {dest}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mirrors(published: tuple[str, ...]) -> tuple[str, ...]:
    override = os.environ.get("TRAINKIT_MIRROR")  # a local mirror, for offline sites and tests
    return (override.rstrip("/") + "/",) if override else published


def download_timeout() -> float:
    text = os.environ.get("TRAINKIT_DOWNLOAD_TIMEOUT", "").strip()
    if not text:
        return DOWNLOAD_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise TrainkitError(f"TRAINKIT_DOWNLOAD_TIMEOUT must be a number of seconds greater than 0, "
                            f"got {text[:80]!r}")
    return seconds


class _Fetch(threading.Thread):
    """Copies a URL into an open file, in a thread of its own: a mirror that sends a byte every
    few seconds never trips a socket timeout, so the caller watches the deadline from outside,
    and stays free to react to a signal at once."""

    def __init__(self, url: str, out, timeout: float):
        super().__init__(daemon=True)
        self.url, self.out, self.timeout = url, out, timeout
        self.received, self.total, self.error = 0, None, None
        self.started = self.cancelled = False

    def run(self) -> None:
        try:
            with self.out, urllib.request.urlopen(self.url, timeout=self.timeout) as response:
                self.total = int(response.headers.get("Content-Length") or 0) or None
                self.started = True
                # read1 returns what has arrived; read(n) would wait for all n bytes.
                while not self.cancelled and (chunk := response.read1(1 << 16)):
                    self.out.write(chunk)
                    self.received += len(chunk)
        except BaseException as exc:  # handed to the caller: a thread must not print a traceback
            self.error = exc


class _DeadlinePassed(Exception):
    pass


def _fetch(url: str, out, deadline: float, make_bar) -> None:
    """Download `url` into `out` (which this closes), or raise _DeadlinePassed at `deadline`.
    `make_bar(total)` makes the progress bar, once the mirror has answered."""
    fetch = _Fetch(url, out, timeout=max(0.1, min(SOCKET_TIMEOUT, deadline - time.monotonic())))
    fetch.start()
    bar = None
    try:
        while True:
            fetch.join(0.1)
            if fetch.started:
                if bar is None:
                    bar = make_bar(fetch.total)
                bar.update(fetch.received - bar.n)
            if not fetch.is_alive():
                break
            if time.monotonic() > deadline:
                raise _DeadlinePassed(f"{fetch.received} of {fetch.total or 'unknown'} bytes received")
    finally:
        fetch.cancelled = True  # it stops at its next read; the file it writes is deleted by the caller
        if bar is not None:
            bar.close()
    if fetch.error is not None:
        raise fetch.error


@contextlib.contextmanager
def _signals_stop(what: str):
    """SIGINT / SIGTERM stop a download at once, as a TrainkitError with exit code 128 + signal.

    While training, these signals only set a flag that is checked between steps, which a
    download would not reach for minutes. The handlers in place are put back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def stop(signum, frame):
        restore()  # a second signal goes where it went before
        raise TrainkitError(f"stopped by {signal.Signals(signum).name} while {what}; nothing was kept",
                            exit_code=128 + signum)

    for s in signums:
        signal.signal(s, stop)
    try:
        yield
    finally:
        restore()


def download(what: str, published: tuple[str, ...], filename: str, expected_md5: str, dest_dir: Path,
             progress: bool = True, holds: str = "") -> Path:
    """Download `filename` from the first mirror that has it (`published`, or $TRAINKIT_MIRROR),
    check its MD5, then move it into `dest_dir`. `what` names the dataset in messages, `holds`
    what a data folder must hold to be used instead.

    Every mirror together gets download_timeout() seconds; SIGINT / SIGTERM stop it at once.
    Only a complete, checked file ever appears under the final name.
    """
    from tqdm.auto import tqdm

    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainkitError(f"cannot create {dest_dir} to download {what} into: {exc.strerror}") from None
    dest = dest_dir / filename
    timeout = download_timeout()
    deadline = time.monotonic() + timeout
    errors = []
    with _signals_stop(f"downloading {dest}"):
        for mirror in mirrors(published):
            url = mirror + dest.name
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".download-")
                _fetch(url, os.fdopen(fd, "wb"), deadline,
                       lambda total: tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress))
                if file_md5(Path(tmp)) != expected_md5:
                    errors.append(f"{url}: wrong MD5")
                    continue
                os.replace(tmp, dest)  # only a checked file ever gets the final name
                return dest
            except _DeadlinePassed as exc:
                errors.append(f"{url}: not done within {timeout:g} s, {exc}; TRAINKIT_DOWNLOAD_TIMEOUT "
                              f"sets the time allowed")
                break
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', None) or exc or type(exc).__name__}")
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
    raise TrainkitError(f"{what} file {dest.name} is missing from {dest_dir} and could not be "
                        f"downloaded ({'; '.join(errors)}); copy the files there, or point --data-dir "
                        f"(or TRAINKIT_DATA_DIR) at a folder holding {holds}")
