"""A run, built once from a config and passed on: `build_run(cfg)` makes every piece (data, model,
loaders, optimizer, schedule, loss, precision and device: experiment.build_experiment) and the
callbacks, in one order; `engine.fit(run)` trains it; `Run.state_dict()` is what a checkpoint holds.

The callbacks trainkit adds itself are the rows of BUILT_IN, in the order they are called. A row
names what turns it on: a TrainConfig setting, or one of build_run's `console` / `signals` (the
command line's) or a run folder. The user's callbacks come where USER_CALLBACKS says: after those
that change what is computed or shown, before those that write, so that what they decide at an
epoch's end (a stop) is in that epoch's checkpoint.

    order   callback            turned on by              acts
    1       GradientClipping    --clip-grad-norm          step
    2       EMA                 --ema                     epochs
    3       TargetAccuracy      --target-acc              epochs
    4       EarlyStopping       --patience                epochs
    5       BestWeights         --final best              epochs
    6       ConsoleLogger       console (the CLI)         console
    7       SignalStop          signals (the CLI)         console
            the user's callbacks, in the order given
    8       RunDirectory        a run folder              folder
    9       FinalReports        a run folder              folder
    10      CheckLog            --evals-per-epoch > 1     folder
    11      TensorBoardLogger   --tensorboard             folder
    12      MLflowLogger        --mlflow                  tracking   (after the writers: it logs their files)

A new built-in callback with a flag: a field in TrainConfig and the callback's class, and its row here.
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
from ..loop.callbacks import EMA, BestWeights, CheckLog, EarlyStopping, GradientClipping, SignalStop, TargetAccuracy, \
    TensorBoardLogger
from ..loop.engine import Callback, History
from .experiment import Experiment, build_experiment
from .reports import ConsoleLogger, FinalReports
from .rundir import RunDirectory
from .tracking import MLflowLogger


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

ACTS = {
    "step": "inside each training step",
    "epochs": "on evaluations and epochs",
    "console": "on the console",
    "folder": "on the run folder",
    "tracking": "in a tracking store",
}


@dataclass(frozen=True)
class BuiltIn:
    """A callback trainkit adds itself when `setting` asks for it."""

    callback: type                         # its class (main_process_only: made on rank 0 alone)
    setting: str                           # a TrainConfig field (on unless None or False), or "console",
                                           # "signals" (build_run's), "folder" (the run has one)
    make: Callable[[Run], Callback]
    acts: str                              # a key of ACTS; lr-find and bench's steps make "step" ones only
    on: Callable[[TrainConfig], bool] | None = None   # a setting with more than on and off
    also: tuple[str, ...] = ()             # settings that only matter with it (refused with it)

    def wanted(self, run: Run, options: dict) -> bool:
        if self.acts == "folder" and not options["folder"]:
            return False
        if self.setting in options:
            return options[self.setting]
        return self.on(run.cfg) if self.on else getattr(run.cfg, self.setting) not in (None, False)


BUILT_IN: tuple[BuiltIn, ...] = (
    BuiltIn(GradientClipping, "clip_grad_norm", lambda run: GradientClipping(run.cfg.clip_grad_norm), "step"),
    BuiltIn(EMA, "ema", lambda run: EMA(run.cfg.ema), "epochs"),
    BuiltIn(TargetAccuracy, "target_acc", lambda run: TargetAccuracy(run.cfg.target_acc), "epochs"),
    BuiltIn(EarlyStopping, "patience", lambda run: EarlyStopping(run.cfg.patience), "epochs"),
    BuiltIn(BestWeights, "final", lambda run: BestWeights(), "epochs",   # acts only with a validation split
            on=lambda cfg: cfg.final == "best"),
    BuiltIn(ConsoleLogger, "console", lambda run: ConsoleLogger(run.cfg.progress), "console"),
    BuiltIn(SignalStop, "signals", lambda run: SignalStop().install(), "console"),
    # the user's callbacks: USER_CALLBACKS
    BuiltIn(RunDirectory, "folder", lambda run: RunDirectory(run, run.run_dir), "folder"),
    BuiltIn(FinalReports, "folder", lambda run: FinalReports(run.callback(RunDirectory), run.data,
                                                             run.cfg.test_batch_size, run.device), "folder"),
    BuiltIn(CheckLog, "evals_per_epoch", lambda run: CheckLog(run.run_dir / "checks.csv"), "folder",
            on=lambda cfg: cfg.evals_per_epoch > 1),
    BuiltIn(TensorBoardLogger, "tensorboard", lambda run: TensorBoardLogger(run.run_dir / "tensorboard",
                                                                           settings=run.cfg.to_dict()), "folder"),
    BuiltIn(MLflowLogger, "mlflow", lambda run: MLflowLogger(run.cfg.mlflow, run.run_dir,
                                                            register=run.cfg.mlflow_register), "tracking",
            also=("mlflow_register",)),
)
USER_CALLBACKS = 7      # the user's callbacks go after the first 7 rows


def assemble(run: Run, user: Sequence[Callback] = (), *, console: bool = False, signals: bool = False,
             steps_only: bool = False) -> list[Callback]:
    """The run's callbacks: BUILT_IN's rows that its settings and options ask for, in order, the
    user's at USER_CALLBACKS. A callback that says `main_process_only` runs on rank 0 alone."""
    main = run.rank.is_main
    options = {"console": console, "signals": signals, "folder": run.run_dir is not None and main}
    run.callbacks = []      # filled in order: a row may use one made before it (FinalReports its folder)
    for place, row in enumerate(BUILT_IN):
        if place == USER_CALLBACKS:
            run.callbacks += [cb for cb in user if main or not getattr(cb, "main_process_only", False)]
        if steps_only and row.acts != "step":
            continue
        if row.wanted(run, options) and (main or not getattr(row.callback, "main_process_only", False)):
            run.callbacks.append(row.make(run))
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

