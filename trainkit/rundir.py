"""The run directory: what a run leaves behind, what its checkpoints hold, and how it resumes.

    runs/<timestamp>/  config.json  metrics.csv  last.pt  best.pt       (after every epoch)
                       samples.png                                       (at the start)
                       model.pt  plot.png  confusion.png  mistakes.png  summary.txt   (at the end)
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from . import checkpoint as ckpt
from . import reports
from .config import TrainConfig, flag_name, from_mapping, load_config_file
from .datasets import ImageData
from .engine import Callback, History, TrainState, unwrap
from .errors import TrainkitError
from .experiment import Experiment, canonical
from .loaders import TensorLoader
from .models import count_parameters, model_source

FILES = ("config.json", "metrics.csv", "plot.png", "samples.png", "confusion.png", "mistakes.png", "model.pt",
         "summary.txt", "last.pt", "best.pt")

# Settings that may differ when a run is resumed: they change how it is shown or where it runs,
# not what it computes.
MAY_CHANGE_ON_RESUME = {"progress", "workers", "device", "tensorboard", "data_dir"}
# Schedules planned for a fixed number of steps: their runs cannot be extended.
FIXED_LENGTH_SCHEDULES = {"onecycle", "cosine"}


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare(path: Path) -> Path:
    """Make a new run directory, refusing one that already holds a run."""
    if (path / "last.pt").exists():
        raise TrainkitError(f"{path} already holds a run; continue it with --resume {path}, or choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(path)
        ckpt.atomic_write_text(path / ".write-test", "")
        (path / ".write-test").unlink()
    except OSError as exc:
        raise TrainkitError(f"cannot write to the run directory {path}: {exc.strerror}") from None
    return path


def data_info(data: ImageData) -> dict:
    """What config.json records of the data: enough to preprocess an image as training did."""
    return {"name": data.name, "classes": data.classes, "mean": list(data.mean), "std": list(data.std),
            "image_shape": list(data.image_shape), "channels": data.image_shape[0],
            "train_size": len(data.train_labels), "test_size": len(data.test_labels),
            "val_size": len(data.val_labels) if data.val_labels is not None else 0}


def model_info(exp: Experiment) -> dict:
    """What config.json records of the model: how to build it again, and what it returns."""
    source = {"kind": "python", "name": exp.cfg.model} if exp.cfg.model.startswith("python:") \
        else model_source(exp.cfg.model)
    return {**source, "class": type(exp.model).__name__, "outputs": exp.outputs,
            "parameters": count_parameters(exp.model),
            "arguments": {"in_channels": exp.data.image_shape[0], "num_classes": exp.data.num_classes}}


# ---------------------------------------------------------------------------------------------
# Checkpoint contents

def checkpoint_state(exp: Experiment, history: History, callbacks: Sequence[Callback] = (),
                     partial: dict | None = None) -> dict:
    """Everything needed to continue: weights, optimizer, schedule, every RNG, history, config,
    and the state of each callback that keeps one (early stopping's counter, an average of the weights).

    `partial` is the progress of an epoch stopped part way (by a signal), else None.
    """
    return {"format": ckpt.FORMAT, "epoch": len(history), "partial": partial, "config": exp.cfg.to_dict(),
            "model_name": type(exp.model).__name__, "model": exp.model.state_dict(),
            "optimizer": exp.optimizer.state_dict(),
            "scheduler": exp.scheduler.state_dict() if exp.scheduler is not None else None,
            "rng": exp.rng_state(), "history": history.rows(),
            "callbacks": {cb.state_key: s for cb in callbacks if (s := cb.state_dict())}}


def restore(exp: Experiment, state: dict, source: str, callbacks: Sequence[Callback] = ()) -> dict:
    """Put a checkpoint's state back into `exp` and `callbacks`; returns fit's `resume` argument."""
    ckpt.load_weights_into(exp.model, state["model"], source)
    try:
        exp.optimizer.load_state_dict(state["optimizer"])
        if exp.scheduler is not None:
            exp.scheduler.load_state_dict(state["scheduler"])
        exp.set_rng_state(state["rng"])
        saved = state.get("callbacks", {})
        for cb in callbacks:
            if cb.state_key in saved:
                cb.load_state_dict(saved[cb.state_key])
        return {"history": state["history"], "partial": state.get("partial")}
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise TrainkitError(f"{source} does not match this run's optimizer, schedule or callbacks ({exc})") from None


def load_resume_config(run_dir: Path, overrides: dict) -> TrainConfig:
    """The saved config of a run, checked against flags given again with --resume."""
    if not (run_dir / "last.pt").is_file():
        raise TrainkitError(f"{run_dir} holds no checkpoint (last.pt) to resume from")
    saved = from_mapping(load_config_file(run_dir / "config.json"))
    given = canonical(saved.replace(**overrides))     # paths compared as absolute paths
    for name in overrides:
        if name == "epochs" and given.epochs != saved.epochs:
            if saved.scheduler in FIXED_LENGTH_SCHEDULES:
                raise TrainkitError(f"--epochs cannot change when resuming a run with --scheduler {saved.scheduler}: "
                                    f"its schedule was planned for {saved.epochs} epochs")
        elif name not in MAY_CHANGE_ON_RESUME and getattr(given, name) != getattr(saved, name):
            raise TrainkitError(f"{flag_name(name)} {getattr(given, name)} contradicts the run being resumed "
                                f"({getattr(saved, name)}); leave it out to resume with the saved settings")
    return saved.replace(**{k: getattr(given, k) for k in overrides if k in MAY_CHANGE_ON_RESUME | {"epochs"}})


# ---------------------------------------------------------------------------------------------
# Writing it

class RunDirectory(Callback):
    """Writes the run directory: config.json and samples at the start, the checkpoints and
    metrics.csv after every epoch (or a mid-epoch checkpoint when interrupted), the reports at the end."""

    def __init__(self, exp: Experiment, path: Path):
        self.exp, self.dir = exp, Path(path)

    def _guard(self, what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            last = self.dir / "last.pt"
            kept = f"; the last good checkpoint is {last}" if last.exists() else ""
            raise TrainkitError(f"could not write {what} in {self.dir}: {exc.strerror or exc}{kept}") from None

    def start(self) -> None:
        """config.json and samples.png of a new run."""
        exp = self.exp
        saved = {"config": exp.cfg.to_dict(), "environment": reports.environment(exp.device, exp.amp_dtype),
                 "data": data_info(exp.data), "model": model_info(exp), "parameters": count_parameters(exp.model)}
        self._guard("config.json", lambda: ckpt.atomic_write_text(self.dir / "config.json", json.dumps(saved, indent=2)))
        loader = exp.train_loader
        position = loader.state_dict()  # drawing the samples must not change what training sees
        self._guard("samples.png", lambda: reports.plot_samples(loader, exp.data.classes, exp.data.mean,
                                                                exp.data.std, self.dir / "samples.png"))
        loader.load_state_dict(position)

    def _save_checkpoint(self, state: TrainState, *names: str, partial: dict | None = None) -> None:
        contents = checkpoint_state(self.exp, state.history, state.callbacks, partial)
        for name in names:
            self._guard(name, lambda: ckpt.atomic_torch_save(contents, self.dir / name))

    def on_epoch_end(self, state: TrainState) -> None:
        history = state.history
        best = history[-1].score >= history.best_acc
        self._save_checkpoint(state, "last.pt", *(["best.pt"] if best else []))
        self._guard("metrics.csv", lambda: ckpt.atomic_write_text(self.dir / "metrics.csv",
                                                                   reports.metrics_csv(history)))

    def on_fit_end(self, state: TrainState) -> None:
        if state.interrupted:
            # Under torchrun the ranks stop at different steps, so only finished epochs are kept.
            if state.partial is not None and self.exp.rank.world == 1:
                self._save_checkpoint(state, "last.pt", partial=state.partial)
            return
        self._guard("metrics.csv", lambda: ckpt.atomic_write_text(self.dir / "metrics.csv",   # with the final test
                                                                   reports.metrics_csv(state.history)))
        self.finish(state.history, unwrap(state.eval_model or self.exp.model))

    def finish(self, history: History, model) -> None:
        """The final reports, of `model` (the evaluated weights) on the whole test set."""
        exp, data = self.exp, self.exp.data
        loader = TensorLoader(data.test_images, data.test_labels, exp.cfg.test_batch_size, mean=data.mean,
                              std=data.std, device=exp.device)  # the whole test set, on every rank count
        out, labels, losses, images = reports.predictions(model, loader, exp.device)
        matrix = reports.confusion_matrix(out.argmax(1), labels, data.num_classes)
        summary = reports.run_summary(model, data, history, matrix)

        def write_all():
            ckpt.save_weights(model, self.dir / "model.pt")
            reports.plot_history(history, self.dir / "plot.png")
            reports.plot_confusion(matrix, data.classes, self.dir / "confusion.png")
            reports.plot_mistakes(images, out, labels, losses, data.classes, data.mean, data.std,
                                  self.dir / "mistakes.png")
            ckpt.atomic_write_text(self.dir / "summary.txt", summary)

        self._guard("the final reports", write_all)
