"""A run, built once from a config and passed on: `build_run(cfg)` makes every piece (data, model,
loaders, optimizer, schedule, loss, precision and device: experiment.build_experiment) and the
callbacks, in one order; `engine.fit(run)` trains it; `Run.state_dict()` is what a checkpoint holds.

The callbacks trainkit adds itself register on their own classes in engine.BUILT_IN, each with its
place in the order, what turns it on (a TrainConfig setting, or one of build_run's `console` /
`signals` (the command line's) or a run folder) and where it acts. The user's callbacks come at
USER_PLACE: after those that change what is computed or shown, before those that write, so that
what they decide at an epoch's end (a stop) is in that epoch's checkpoint.

    place   callback            turned on by              acts
    10      GradientClipping    --clip-grad-norm          step
    20      EMA                 --ema                     epochs
    30      TargetAccuracy      --target-acc              epochs
    40      EarlyStopping       --patience                epochs
    50      BestWeights         --final best              epochs
    60      ConsoleLogger       console (the CLI)         console
    70      SignalStop          signals (the CLI)         console
    75      the user's callbacks, in the order given
    80      RunDirectory        a run folder              folder
    90      FinalReports        a run folder              folder
    100     CheckLog            --evals-per-epoch > 1     folder
    110     TensorBoardLogger   --tensorboard             folder
    120     MLflowLogger        --mlflow                  tracking   (after the writers: it logs their files)

A new built-in callback with a flag: a field in TrainConfig, and the callback's class registered
with its place (`@BUILT_IN.register(place=..., setting=..., acts=..., make=...)`); nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import TrainConfig
from ..data.dataset import ImageData
from ..errors import TrainkitError
from ..loop import callbacks as loop_callbacks
from ..loop.engine import BUILT_IN, Callback, History
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


# ---------------------------------------------------------------------------------------------
# The built-in callbacks, in order

USER_PLACE = 75     # the user's callbacks: after the built-in ones placed before it, before the others
REGISTERING = (loop_callbacks, reports, rundir, tracking)   # the modules whose callbacks register in BUILT_IN


@dataclass(frozen=True)
class BuiltIn:
    """A built-in callback's class and the facts it registered with (engine.BUILT_IN)."""

    callback: type                         # main_process_only: made on rank 0 alone
    place: int
    setting: str
    acts: str
    make: Callable[[Run], Callback]
    on: Callable[[TrainConfig], bool] | None = None

    def wanted(self, run: Run, options: dict) -> bool:
        if self.acts == "folder" and not options["folder"]:
            return False
        if self.setting in options:
            return options[self.setting]
        return self.on(run.cfg) if self.on else getattr(run.cfg, self.setting) not in (None, False)


def built_in() -> list[BuiltIn]:
    """Every registered built-in callback, in the order they are called."""
    rows = [BuiltIn(BUILT_IN[name], **BUILT_IN.facts(name)) for name in BUILT_IN]
    return sorted(rows, key=lambda row: row.place)


def assemble(run: Run, user: Sequence[Callback] = (), *, console: bool = False, signals: bool = False,
             steps_only: bool = False) -> list[Callback]:
    """The run's callbacks: the built-in ones that its settings and options ask for, by place, the
    user's at USER_PLACE. A callback that says `main_process_only` runs on rank 0 alone."""
    main = run.rank.is_main
    options = {"console": console, "signals": signals, "folder": run.run_dir is not None and main}
    run.callbacks = []      # filled in order: a row may use one made before it (FinalReports its folder)
    users = [cb for cb in user if main or not getattr(cb, "main_process_only", False)]
    for row in built_in():
        if users and row.place > USER_PLACE:
            run.callbacks += users
            users = []
        if steps_only and row.acts != "step":
            continue
        if row.wanted(run, options) and (main or not getattr(row.callback, "main_process_only", False)):
            run.callbacks.append(row.make(run))
    run.callbacks += users
    return run.callbacks


def build_run(cfg: TrainConfig, *, data: ImageData | None = None, model: nn.Module | None = None,
              callbacks: Sequence[Callback] = (), run_dir: str | Path | None = None, console: bool = False,
              signals: bool = False, steps_only: bool = False, before_manifests: bool = False) -> Run:
    """Every piece of a run from `cfg` (experiment.build_experiment: `data` and `model` replace the
    configured ones) and its callbacks (assemble). `run_dir`: the folder it writes (taken by
    rundir.prepare or resumed before fit: run.py); `console`: the CLI's lines and progress bar;
    `signals`: SIGINT/SIGTERM interrupt it with a checkpoint; `steps_only`: a command that runs
    training steps and no epochs (lr-find, bench's timed steps) gets the callbacks of a step alone."""
    exp = build_experiment(cfg, data=data, model=model, before_manifests=before_manifests)
    run = Run(**{f.name: getattr(exp, f.name) for f in fields(Experiment)},
              run_dir=Path(run_dir) if run_dir is not None else None)
    assemble(run, callbacks, console=console, signals=signals, steps_only=steps_only)
    return run

