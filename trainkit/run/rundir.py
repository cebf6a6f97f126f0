"""The run directory: the folder a run owns (its lock), the files it leaves there (atomically),
and `RunDirectory`, the callback that writes them. What a checkpoint holds is the Run's
(assembly.Run.state_dict); resuming is resume.py's; the final reports are reports.FinalReports.

    runs/<timestamp>/  .trainkit.lock  config.json  samples.png           (at the start)
                       last.pt  best.pt  metrics.csv       (after every epoch, last.pt first)
                       metrics.csv  model.pt  plot.png  confusion.png  mistakes.png  summary.txt   (at the end)

last.pt is the commit point: written first after each epoch, it holds everything the other files
are made from (the history, whether its epoch is the best so far, whether the run is finished),
so `--resume` re-creates whatever a kill left missing or stale (`RunDirectory.repair`, then the
final files at the end of `fit`). The run owns its folder for as long as it runs: `lock_run`.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Callable

from .. import checkpoint as ckpt
from ..data import manifest
from ..data.dataset import ImageData
from ..errors import TrainkitError
from ..loop.engine import Callback, History, TrainState
from ..models import count_parameters, model_source
from . import reports

FILES = ("config.json", manifest.FILE, "metrics.csv", "plot.png", "samples.png", "confusion.png", "mistakes.png", "model.pt",
         "summary.txt", "last.pt", "best.pt")
LOCK = ckpt.LOCK                 # held (flock) by the one process that writes the run
# What a run holds before its first checkpoint: such a folder may be used again as a new run.
BEFORE_FIRST_CHECKPOINT = {LOCK, "config.json", manifest.FILE, "samples.png", "tensorboard", "checks.csv"}
# Names whose temporaries an older trainkit (prefix `.tmp-`) may have left.
OWN_NAMES = FILES + (".write-test",)


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class RunLock:
    """An exclusive flock on a run folder's `.trainkit.lock`, held until `release` (or the process
    ends). `release` removes the file, so a run that ended leaves no empty lock file behind."""

    def __init__(self, fd: int | None, path: Path | None = None):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)    # while still held: whoever opens the name next makes a new file
            os.close(self.fd)   # closing the only descriptor releases the flock
            self.fd = None


def lock_run(path: Path) -> RunLock:
    """Take the run folder `path` (which exists) for this process, or refuse in one line when
    another trainkit process holds it. Writes nothing but the (empty) lock file."""
    lock_path = path / LOCK
    while True:
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise TrainkitError(f"cannot write to the run directory {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainkitError(f"{path} is in use by another trainkit process (pid {_lock_holder(lock_path)}); "
                                f"wait for it to end, or choose another --out") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                os.close(fd)
                raise TrainkitError(f"cannot lock the run directory {path}: {exc.strerror}") from None
            return RunLock(fd)      # a filesystem without flock (some network mounts): the run goes on unlocked
        if _same_file(fd, lock_path):
            return RunLock(fd, lock_path)
        os.close(fd)    # the holder removed the file between our open and our lock: take the new one


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (a releasing holder unlinks it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock_holder(lock_path: Path) -> str:
    """The pid holding a flock on `lock_path`, from /proc/locks (Linux); "unknown" elsewhere."""
    try:
        inode = os.stat(lock_path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()   # 1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    return fields[4]
    except OSError:
        pass
    return "unknown"


def is_run_config(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "config" in saved and "environment" in saved


def _check_new_run_folder(path: Path) -> None:
    """A new run goes into a new or empty folder, or one holding only what a run writes before its
    first checkpoint (nothing was trained there); never into a run, nor among someone's files."""
    if (path / "last.pt").exists():
        raise TrainkitError(f"{path} already holds a run; continue it with --resume {path}, or choose another --out")
    others = sorted(p.name for p in path.iterdir()
                    if not (p.name in BEFORE_FIRST_CHECKPOINT or ckpt.is_temporary(p.name, OWN_NAMES))
                    or p.name == "config.json" and not is_run_config(p))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise TrainkitError(f"--out {path} is a folder that holds other files ({shown}); a new run goes into a "
                            f"new or empty folder: choose another --out")


def prepare(path: Path) -> RunLock:
    """Make a new run directory and take it (lock_run), refusing a folder that holds a run or
    anything else than a run stopped before its first checkpoint. Returns the lock."""
    held = None
    try:
        if (path / LOCK).is_file():
            held = lock_run(path)         # a run in progress there is "in use", whatever it holds so far
        if path.is_dir():
            _check_new_run_folder(path)   # before writing anything there, even the lock file
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainkitError(f"cannot write to the run directory {path}: {exc.strerror}") from None
        held = held or lock_run(path)
        _check_new_run_folder(path)       # again, now that no other process can start a run there
        ckpt.remove_stale_temporaries(path, OWN_NAMES)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


def data_info(data: ImageData) -> dict:
    """What config.json records of the data: enough to preprocess an image as training did."""
    return {"name": data.name, "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
            "image_shape": list(data.image_shape), "channels": data.image_shape[0],
            "train_size": len(data.train_labels), "test_size": len(data.test_labels),
            "val_size": len(data.val_labels) if data.val_labels is not None else 0}


def model_info(run) -> dict:
    """What config.json records of the model (`run`: an assembly.Run): how to build it again, and what it returns."""
    source = {"kind": "python", "name": run.cfg.model} if run.cfg.model.startswith("python:") \
        else model_source(run.cfg.model)
    return {**source, "class": type(run.model).__name__, "outputs": run.outputs,
            "parameters": count_parameters(run.model),
            "arguments": {"in_channels": run.data.image_shape[0], "num_classes": run.data.num_classes}}


# ---------------------------------------------------------------------------------------------
# Writing it

class RunDirectory(Callback):
    """Writes the run directory: config.json and samples at the start, after every epoch last.pt
    (first: the commit point; what the Run's state_dict holds), best.pt and metrics.csv (or a
    mid-epoch checkpoint when interrupted), metrics.csv again at the end. Every file is written
    atomically (`guard`, `figure`: also reports.FinalReports' files)."""

    main_process_only = True     # under torchrun, rank 0 alone writes

    def __init__(self, run, path: Path):
        self.run, self.dir = run, Path(path)     # run: an assembly.Run

    def guard(self, what: str, write: Callable[[], None]) -> None:
        """Run `write`; a failure to write is one line that names the last good checkpoint."""
        try:
            write()
        except OSError as exc:
            last = self.dir / "last.pt"
            kept = f"; the last good checkpoint is {last}" if last.exists() else ""
            raise TrainkitError(f"could not write {what} in {self.dir}: {exc.strerror or exc}{kept}") from None

    def figure(self, plot: Callable[..., object], *args, name: str) -> None:
        """A figure drawn by `plot(*args)`, written atomically to `name`."""
        fig = plot(*args)
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=80, format="png")
        reports.pyplot().close(fig)
        ckpt.atomic_write_bytes(self.dir / name, buffer.getvalue())

    def start(self) -> None:
        """config.json and samples.png of a new run."""
        exp = self.run
        saved = {"config": exp.cfg.to_dict(), "environment": reports.environment(exp.device, exp.amp_dtype),
                 "data": data_info(exp.data), "model": model_info(exp), "parameters": count_parameters(exp.model),
                 "tuning": exp.tuning}
        files = exp.data.manifest()      # what eval and --resume check the data against
        saved[manifest.RECORDED] = files is not None        # so that a lost data.json is noticed
        self.guard("config.json", lambda: ckpt.atomic_write_text(self.dir / "config.json", json.dumps(saved, indent=2)))
        if files is not None:
            self.guard(manifest.FILE, lambda: ckpt.atomic_write_text(self.dir / manifest.FILE, json.dumps(files)))
        loader = exp.train_loader
        position = loader.state_dict()  # drawing the samples must not change what training sees
        self.guard("samples.png", lambda: self.figure(reports.plot_samples, loader, exp.data.classes, exp.data.mean,
                                                        exp.data.std, name="samples.png"))
        loader.load_state_dict(position)

    def _save_checkpoint(self, state: TrainState, *names: str, partial: dict | None = None,
                         best: bool = False, finished: bool = False) -> None:
        contents = self.run.state_dict(partial=partial, best=best, finished=finished)
        data = ckpt.checkpoint_bytes(contents)   # last.pt and best.pt: the same bytes
        for name in names:
            self.guard(name, lambda: ckpt.atomic_write_bytes(self.dir / name, data))

    def _write_metrics(self, history: History) -> None:
        self.guard("metrics.csv", lambda: ckpt.atomic_write_text(self.dir / "metrics.csv",
                                                                   reports.metrics_csv(history)))

    def on_epoch_end(self, state: TrainState) -> None:
        history = state.history
        best = history[-1].score >= history.best_acc
        finished = len(history) >= self.run.cfg.epochs or state.stop_requested
        # last.pt first: once it is on disk the epoch is committed, and repair() makes the rest from it.
        self._save_checkpoint(state, "last.pt", *(["best.pt"] if best else []), best=best, finished=finished)
        self._write_metrics(history)

    def repair(self, saved: dict) -> None:
        """Before a resumed run goes on: re-create what a kill after last.pt (`saved`) was written
        left missing or stale: best.pt when last.pt's epoch is the best, and metrics.csv. The final
        files of a finished run are written again at the end of fit (on_fit_end)."""
        last = self.dir / "last.pt"
        if saved.get("best") and not saved.get("partial"):
            data = self._read(last)
            if self._read(self.dir / "best.pt") != data:
                self.guard("best.pt", lambda: ckpt.atomic_write_bytes(self.dir / "best.pt", data))
        history = History.from_rows(saved["history"])
        try:
            with open(self.dir / "metrics.csv", newline="") as f:
                rows = [(row.get("epoch"), row.get("seconds")) for row in csv.DictReader(f)]
        except (OSError, ValueError, csv.Error):
            rows = None
        if rows != [(str(r.epoch), str(r.seconds)) for r in history]:   # the epochs last.pt holds, and no other
            self._write_metrics(history)

    def record_config(self) -> None:
        """A resumed run's config.json says what runs now: an extended --epochs, say, so that
        `--config RUN/config.json` trains the same run and `compare` sees one value. Atomic, and
        only when something changed; the other sections (environment, data, model) are kept."""
        path = self.dir / "config.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict) or saved.get("config") == self.run.cfg.to_dict():
            return
        saved["config"] = self.run.cfg.to_dict()
        # the settings written now include ones added after data.json; say whether this run has one
        saved.setdefault(manifest.RECORDED, (self.dir / manifest.FILE).is_file())
        self.guard("config.json", lambda: ckpt.atomic_write_text(path, json.dumps(saved, indent=2)))

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None

    def on_fit_end(self, state: TrainState) -> None:
        if state.interrupted:
            # Under torchrun the ranks stop at different steps, so only finished epochs are kept.
            if state.partial is not None and self.run.rank.world == 1:
                self._save_checkpoint(state, "last.pt", partial=state.partial)
            return
        self._write_metrics(state.history)   # with the final test; then FinalReports' files
