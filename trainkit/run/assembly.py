"""A run, built once from a config and passed on: `build_run(cfg)` makes every piece (data, model,
loaders, optimizer, schedule, loss, precision and device: experiment.build_experiment) and the
callbacks (`built_in_callbacks`, which says why each sits where it does); `engine.fit(run)` trains
it; `Run.state_dict()` is what a checkpoint holds.

A new built-in callback with a flag: a field in TrainConfig, and one line in `built_in_callbacks`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch.nn as nn

from ..config import TrainConfig
from ..data.dataset import ImageData
from ..loop.callbacks import EMA, BestWeights, CheckLog, EarlyStopping, GradientClipping, SignalStop, TargetAccuracy, TensorBoardLogger
from ..loop.engine import Callback
from . import reports, rundir, tracking
from .experiment import Run, build_experiment


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
    run = build_experiment(cfg, data=data, model=model, before_manifests=before_manifests)
    run.run_dir = Path(run_dir) if run_dir is not None else None
    run.callbacks = built_in_callbacks(run, callbacks, console=console, signals=signals, steps_only=steps_only)
    return run

