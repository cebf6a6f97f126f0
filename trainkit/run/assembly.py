"""A run, built once from a config and passed on: `build_run(cfg)` makes every piece (data, model,
loaders, optimizer, schedule, loss, precision and device: experiment.build_experiment) and the
callbacks (`built_in_callbacks`, which says why each sits where it does); `engine.fit(run)` trains
it; `Run.state_dict()` is what a checkpoint holds.

A new built-in callback with a flag: a field in TrainConfig, and one line in `built_in_callbacks`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..data.dataset import ImageData
from ..errors import TrainkitError
from ..loop.callbacks import EMA, BestWeights, CheckLog, EarlyStopping, GradientClipping, SignalStop, TargetAccuracy, TensorBoardLogger
from ..loop.engine import Callback, History
from . import reports, rundir, tracking
from .experiment import Experiment, build_experiment


@dataclass
class Run(Experiment):
    """One training run: its pieces (Experiment's fields), its callbacks in their order, its folder
    (None: nothing written) and its history so far. `engine.fit(run)` trains it."""

    callbacks: list[Callback] = field(default_factory=list)
    run_dir: Path | None = None
    history: History = field(default_factory=History)   # the finished epochs (a resumed run's too)
    partial: dict | None = None    # a resumed run's unfinished epoch, as its checkpoint holds it

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    @property
    def evals_per_epoch(self) -> int:
        return self.cfg.evals_per_epoch

    def callback(self, kind: type) -> Callback | None:
        """The run's first callback of type `kind`, if it has one."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    def state_dict(self, *, partial: dict | None = None, best: bool = False, finished: bool = False) -> dict:
        """What a checkpoint holds: weights, optimizer, schedule, every RNG, history, config, and the
        state of each callback that keeps one (early stopping's counter, an average of the weights).

        `partial` is the progress of an epoch stopped part way (by a signal), else None. `best`: this
        is the best epoch so far (best.pt holds the same bytes); `finished`: the run has ended (all
        its epochs, or stopped by a callback), so only the final files remain to be written.
        """
        return {"format": ckpt.FORMAT, "epoch": len(self.history), "partial": partial, "best": best,
                "finished": finished, "config": self.cfg.to_dict(),
                "model_name": type(self.model).__name__, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": self.rng_state(), "history": self.history.rows(),
                "callbacks": {cb.state_key: s for cb in self.callbacks if (s := cb.state_dict())}}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Put a checkpoint's state back: weights, optimizer, schedule, RNGs, each callback's state,
        and the history and unfinished epoch that `fit(run)` continues from."""
        ckpt.load_weights_into(self.model, state["model"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.set_rng_state(state["rng"])
            saved = state.get("callbacks", {})
            for cb in self.callbacks:
                if cb.state_key in saved:
                    cb.load_state_dict(saved[cb.state_key])
            self.history, self.partial = History.from_rows(state["history"]), state.get("partial")
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise TrainkitError(f"{source} does not match this run's optimizer, schedule or callbacks ({exc})") from None


def built_in_callbacks(run: Run, user: Sequence[Callback] = (), *, console: bool = False, signals: bool = False,
                       steps_only: bool = False) -> list[Callback]:
    """The run's callbacks in the order they are called: those its settings and options ask for,
    and the user's. `steps_only` (lr-find, bench's timed steps): those of a training step alone.
    Under torchrun a callback that says `main_process_only` is made on rank 0 alone."""
    cfg, main = run.cfg, run.rank.is_main
    on = lambda value: value not in (None, False)       # a setting left unset (None) or 0 is off
    # Inside each step: the gradients are clipped before the optimizer uses them.
    steps = [GradientClipping(cfg.clip_grad_norm)] if on(cfg.clip_grad_norm) else []
    users = [cb for cb in user if main or not getattr(cb, "main_process_only", False)]
    if steps_only:
        return steps + users
    wanted = [
        # The weights' average first: every check, stop and file below sees the averaged weights.
        on(cfg.ema) and (lambda: EMA(cfg.ema)),
        # The stops judge the numbers of the weights that would be saved.
        on(cfg.target_acc) and (lambda: TargetAccuracy(cfg.target_acc)),
        on(cfg.patience) and (lambda: EarlyStopping(cfg.patience)),
        # Puts the best validation epoch's weights back before the final test (with a validation split).
        cfg.final == "best" and BestWeights,
        # The console, then Ctrl-C / SIGTERM: both only show or end the run, they change no number.
        console and main and (lambda: reports.ConsoleLogger(cfg.progress)),
        signals and (lambda: SignalStop().install()),
    ]
    callbacks = steps + [make() for make in wanted if make] + users
    # The user's come before the writers, so that a stop they decide at an epoch's end is in that
    # epoch's checkpoint. The writers need the folder, and rank 0 alone writes.
    if run.run_dir is not None and main:
        directory = rundir.RunDirectory(run, run.run_dir)
        callbacks += [directory, reports.FinalReports(directory, run.data, cfg.test_batch_size, run.device)]
        if cfg.evals_per_epoch > 1:
            callbacks.append(CheckLog(run.run_dir / "checks.csv"))
        if cfg.tensorboard:
            callbacks.append(TensorBoardLogger(run.run_dir / "tensorboard", settings=cfg.to_dict()))
    # MLflow last: it logs the files the writers above made.
    if on(cfg.mlflow) and main:
        callbacks.append(tracking.MLflowLogger(cfg.mlflow, run.run_dir, register=cfg.mlflow_register))
    return callbacks


def build_run(cfg: TrainConfig, *, data: ImageData | None = None, model: nn.Module | None = None,
              callbacks: Sequence[Callback] = (), run_dir: str | Path | None = None, console: bool = False,
              signals: bool = False, steps_only: bool = False, before_manifests: bool = False) -> Run:
    """Every piece of a run from `cfg` (experiment.build_experiment: `data` and `model` replace the
    configured ones) and its callbacks (built_in_callbacks). `run_dir`: the folder it writes (taken by
    rundir.prepare or resumed before fit: run.py); `console`: the CLI's lines and progress bar;
    `signals`: SIGINT/SIGTERM interrupt it with a checkpoint; `steps_only`: a command that runs
    training steps and no epochs (lr-find, bench's timed steps) gets the callbacks of a step alone."""
    exp = build_experiment(cfg, data=data, model=model, before_manifests=before_manifests)
    run = Run(**{f.name: getattr(exp, f.name) for f in fields(Experiment)},
              run_dir=Path(run_dir) if run_dir is not None else None)
    run.callbacks = built_in_callbacks(run, callbacks, console=console, signals=signals, steps_only=steps_only)
    return run

