"""`trainkit tune SPACE.yaml`: a search over settings with Optuna (extra `trainkit[tune]`).

The search space is a small YAML file; each key is a TrainConfig setting:

    lr: {low: 0.02, high: 0.5, log: true}     # a range: float or int as the setting is
    batch_size: [64, 128, 256]                # choices
    pct_start: {low: 0.1, high: 0.4, step: 0.05}
    label_smoothing: 0.1                      # a fixed value

Every trial trains a run (kept in OUT/trial-NNN/) from the base settings (defaults < --recipe
< --config < flags) with the suggested values, on a validation split (--val-split, 0.1 unless
given): the objective is the last epoch's validation accuracy, never the test set. A median
pruner stops a trial early on the mid-epoch checks (--evals-per-epoch), comparing trials at the
same fraction of an epoch (the same number of training images, whatever their batch sizes) and
never before a trial's first full epoch is evaluated. The study lives in
SQLite (--storage), so a killed search continues where it stopped and several `trainkit tune`
processes can share one study; --trials counts finished (complete and pruned) trials over all
of them. At the end: OUT/best.yaml (the best trial's settings: `trainkit train --config
OUT/best.yaml` trains it again, in the precision and memory format it ran in), OUT/history.png
and OUT/importances.png. Ctrl-C stops the search in one line; the trial it cut is marked failed
and the next `trainkit tune` goes on from the finished ones.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import time
import warnings
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..config import TrainConfig, field_specs, from_mapping, kind_of, load_config_file, show, validate
from ..errors import TrainkitError
from ..loop.engine import Callback, TrainState
from ..outputs import make_folder, save_figure, write_output
from .flags import add_command_flags, add_recipe_flags, config_from_args, number

DEFAULT_VAL_SPLIT = 0.1
# What every trial sets itself: no bars among the trials' lines, no MLflow run per trial.
TRIAL_SETTINGS = {"progress": False, "mlflow": None, "mlflow_register": None}
PER_EPOCH = 1000            # pruning steps: thousandths of an epoch


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TrainkitError("trainkit tune needs optuna: pip install trainkit[tune]") from None
    # ERROR: its warning for a failed trial (Ctrl-C included) is a traceback of 30 lines; the error
    # itself still reaches the CLI, which says it in one line
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---------------------------------------------------------------------------------------------
# The search space

def load_space(path: str | Path, base: TrainConfig) -> dict:
    """The space file as {setting: ("choice", [values]) | ("range", kind, low, high, log, step) |
    ("fixed", value)}, each checked against TrainConfig (its kind and rules) before any training."""
    raw = load_config_file(path)
    fields = {f.name: f for f in field_specs()}
    space = {}
    for key, spec in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise TrainkitError(f"search space {path}: unknown setting {show(key)}")
        if name in TRIAL_SETTINGS:
            raise TrainkitError(f"search space {path}: {name} cannot be searched: every trial runs with it off")
        kind = kind_of(fields[name])
        if isinstance(spec, list):
            if not spec:
                raise TrainkitError(f"search space {path}: {name} has an empty list of choices")
            values = [getattr(from_mapping({name: v}, base), name) for v in spec]
            space[name] = ("choice", values)
            checks = values
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log", "step"}
            if unknown or "low" not in spec or "high" not in spec:
                raise TrainkitError(f"search space {path}: {name} must be a list of choices or "
                                    f"{{low: .., high: .., log: true|false, step: ..}}")
            if kind not in ("int", "float"):
                raise TrainkitError(f"search space {path}: {name} is a {kind} setting; give a list of choices")
            low, high = (getattr(from_mapping({name: spec[b]}, base), name) for b in ("low", "high"))
            if low is None or high is None:
                raise TrainkitError(f"search space {path}: {name} needs numbers for low and high, got "
                                    f"{show(spec['low'])} and {show(spec['high'])}")
            if not (math.isfinite(low) and math.isfinite(high)):      # inf: Optuna's range has no size
                raise TrainkitError(f"search space {path}: {name} needs finite numbers for low and high, got "
                                    f"{low} and {high}")
            if not low < high:
                raise TrainkitError(f"search space {path}: {name} needs low < high, got {low} and {high}")
            log, step = _log_and_step(path, name, kind, spec, low, high)
            space[name] = ("range", kind, low, high, log, step)
            checks = [low, high]
        else:
            value = getattr(from_mapping({name: spec}, base), name)
            space[name] = ("fixed", value)
            checks = [value]
        for value in checks:
            try:
                validate(base.replace(**{name: value}))
            except TrainkitError as exc:
                raise TrainkitError(f"search space {path}: {exc}") from None
    if not space:
        raise TrainkitError(f"search space {path} names no settings")
    return space


def _log_and_step(path, name: str, kind: str, spec: dict, low, high) -> tuple[bool, int | float | None]:
    """A range's `log` and `step`, checked as Optuna would check them during the first trial (an
    error there is a traceback after minutes of work), and never silently changed (`step: 0`)."""
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise TrainkitError(f"search space {path}: {name}'s log must be true or false, got {show(log)}")
    if log and step is not None:
        raise TrainkitError(f"search space {path}: {name} cannot have both log: true and a step "
                            f"(Optuna samples a log range continuously)")
    if log and not low > 0:
        raise TrainkitError(f"search space {path}: {name} with log: true needs low > 0, got {low}")
    if step is None:
        return log, None
    if isinstance(step, bool) or not isinstance(step, (int, float)) or (kind == "int" and not isinstance(step, int)):
        raise TrainkitError(f"search space {path}: {name}'s step must be {'an integer' if kind == 'int' else 'a number'}, "
                            f"got {show(step)}")
    if not (step > 0 and step <= high - low):      # nan fails too
        raise TrainkitError(f"search space {path}: {name}'s step must be greater than 0 and at most "
                            f"high - low ({high - low:g}), got {show(step)}")
    steps = (high - low) / step
    try:        # Optuna's own test, on the numbers' decimal forms: it lowers high with a warning when it fails
        whole = (Decimal(str(high)) - Decimal(str(low))) % Decimal(str(step)) == 0
    except InvalidOperation:        # the quotient is past the decimal precision: more values than it counts
        raise TrainkitError(f"search space {path}: {name}'s step {show(step)} makes too many values of "
                            f"{low:g}..{high:g}; give a larger step, or none") from None
    if not whole:
        raise TrainkitError(f"search space {path}: {name}'s high - low ({high - low:g}) is not a whole number of "
                            f"steps of {step:g}; make high {low + int(steps) * step:g} or change the step")
    return log, step


def suggest(trial, space: dict) -> dict:
    values = {}
    for name, spec in space.items():
        if spec[0] == "choice":
            values[name] = trial.suggest_categorical(name, spec[1])
        elif spec[0] == "fixed":
            values[name] = spec[1]
        else:
            _, kind, low, high, log, step = spec
            if kind == "int":
                values[name] = trial.suggest_int(name, low, high, step=step or 1, log=log)
            else:
                values[name] = trial.suggest_float(name, low, high, step=step, log=log)
    return values


# ---------------------------------------------------------------------------------------------
# Trials

class TrialPruning(Callback):
    """Reports every validation check to the trial and stops the run when the pruner says so;
    `tune` then marks the trial pruned. The step is the epoch fraction trained, in thousandths
    (1500: half-way through the second epoch), so trials with different batch sizes are compared
    after the same number of training images; `images` is how many it trained on in all."""

    def __init__(self, trial, evals_per_epoch: int, epochs: int):
        self.trial, self.evals_per_epoch, self.epochs = trial, evals_per_epoch, epochs
        self.pruned_at: float | None = None     # epochs trained when pruned
        self.images = 0

    def step(self, state: TrainState) -> int:
        """The check's nominal place (check k of n: k/n of the epoch), the same in every trial
        whatever its batch count: engine.check_points puts check k after batches * k // n steps."""
        e, batches = state.evaluation, state.num_batches
        if e.after_batch is None:
            return e.epoch * PER_EPOCH
        n = min(self.evals_per_epoch, batches)
        k = next((k for k in range(1, n) if batches * k // n == e.after_batch), None)
        fraction = k / n if k is not None else e.after_batch / batches
        return (e.epoch - 1) * PER_EPOCH + round(PER_EPOCH * fraction)

    def on_evaluate(self, state: TrainState) -> None:
        e = state.evaluation
        if e.split != "val":
            return
        step = self.step(state)
        self.trial.report(e.acc, step)
        if step < self.epochs * PER_EPOCH and self.trial.should_prune():     # a finished trial is complete
            self.pruned_at = step / PER_EPOCH
            state.stop()

    def on_fit_end(self, state: TrainState) -> None:
        # what the epochs really trained on (an epoch's last batch may be short: 1,843 images in
        # 15 batches of 128), the stopped one's up to the check it stopped at
        self.images = sum(r.train_seen for r in state.history)


def make_pruner():
    """The median of the finished trials at the same step, from the third trial on. Warm-up: no
    pruning before a trial's first full evaluation (the end of its first epoch); its first checks
    say little (30.8% against 35.8% once pruned a trial that went on to 76.5%)."""
    return _optuna().pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=PER_EPOCH)


def trial_config(base: TrainConfig, values: dict) -> TrainConfig:
    cfg = base.replace(**{**values, **TRIAL_SETTINGS})
    if cfg.val_split is None:
        cfg = cfg.replace(val_split=DEFAULT_VAL_SPLIT)
    return validate(cfg)


def finished(study) -> int:
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_study(space_path: Path, base: TrainConfig, trials: int, storage: str, study_name: str, out: Path):
    """Run trials until the study holds `trials` finished ones; returns the study."""
    optuna = _optuna()
    from ..run.training import train

    space = load_space(space_path, base)
    make_folder(out, "--out")
    with storage_errors(storage):
        storage_obj = open_storage(storage)
        pruner = make_pruner()
        study = optuna.create_study(storage=storage_obj, study_name=study_name, direction="maximize",
                                    pruner=pruner, load_if_exists=True)
        study.set_user_attr("space", str(space_path))
        following = len(study.get_trials(deepcopy=False))
    if (out / f"trial-{following:03d}").exists():
        raise TrainkitError(f"{out / f'trial-{following:03d}'} already exists, but study {show(study_name)} in {show(storage)} has "
                            f"{following} trials: its storage was deleted or another one was given; use another "
                            f"--out, or the --storage and --study-name that the trials in {out} belong to")

    said_once = SaidOnce(sys.stdout, ("Validation split",))    # the same split in every trial: one line

    def objective(trial):
        cfg = trial_config(base, suggest(trial, space))
        run_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        pruning = TrialPruning(trial, cfg.evals_per_epoch, cfg.epochs)
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(said_once):
                result = train(cfg, out=run_dir, callbacks=[pruning])
        except TrainkitError as exc:    # one line, not Optuna's warning with the traceback (quiet_failures)
            raise TrainkitError(f"trial {trial.number} ({run_dir}): {exc}", exc.exit_code) from None
        last = result.history[-1]
        # what the trial ran in: --precision and --channels-last auto resolved (config.json's)
        trial.set_user_attr("config", result.run.cfg.to_dict())
        trial.set_user_attr("test_acc", last.test_acc)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        chosen = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        if pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at_epochs", pruning.pruned_at)
            trial.set_user_attr("pruned_at_images", pruning.images)
            print(f"Trial {trial.number}: pruned after {pruning.pruned_at:g} epoch{'' if pruning.pruned_at == 1 else 's'} "
                  f"({pruning.images:,} training "
                  f"images) at {last.val_acc:.2f}% validation ({chosen})", flush=True)
            raise optuna.TrialPruned()
        print(f"Trial {trial.number}: {last.val_acc:.2f}% validation in {time.perf_counter() - start:.0f} s "
              f"({chosen})", flush=True)
        return last.val_acc

    def enough(study, trial):
        if finished(study) >= trials:
            study.stop()

    remaining = trials - finished(study)
    if remaining > 0:
        print(f"Study {study_name!r} in {storage}: {finished(study)} of {trials} trials finished", flush=True)
        with storage_errors(storage), quiet_failures(optuna):
            study.optimize(objective, callbacks=[enough], catch=())
    return study


class SaidOnce(io.TextIOBase):
    """A stream that passes its lines on to `out`, but a line starting with one of `prefixes` only
    the first time such a line comes (print writes a line's text and its end apart: whole lines
    are decided on)."""

    def __init__(self, out, prefixes: tuple[str, ...]):
        self.out, self.prefixes, self.said, self.pending = out, prefixes, set(), ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            prefix = next((p for p in self.prefixes if line.startswith(p)), None)
            if prefix is None or prefix not in self.said:
                self.out.write(line + "\n")
            if prefix is not None:
                self.said.add(prefix)
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def open_storage(storage: str):
    """--storage as an Optuna RDBStorage: a database URL (sqlite:///FILE, postgresql://..., mysql://...).
    A trial whose process was killed stays RUNNING; the heartbeat lets the next process fail it."""
    optuna = _optuna()
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        raise TrainkitError(f"--storage {show(storage)} is not a database URL; use sqlite:///FILE, "
                            f"postgresql://HOST/DB or mysql://HOST/DB") from None
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        # Each connection (the trials', the heartbeat thread's) would get an empty database of its own.
        raise TrainkitError(f"--storage {show(storage)} is an in-memory database, which keeps nothing and which "
                            f"the trials cannot share; give a file: sqlite:///FILE")
    return optuna.storages.RDBStorage(storage, heartbeat_interval=10, grace_period=30)


@contextlib.contextmanager
def storage_errors(storage: str):
    """A database that cannot be opened or written (read-only, not a database, an unknown dialect,
    a missing driver, a server that does not answer) is one line, not SQLAlchemy's traceback."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError) as exc:
        if _interrupted(exc):   # Ctrl-C during a write: an interruption, not a storage that cannot be used
            raise KeyboardInterrupt from None
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, SQLAlchemyError):
            cause = cause.__cause__
        text = getattr(cause, "orig", None) or cause
        reason = (str(text).strip().splitlines() or [type(text).__name__])[0][:200]
        raise TrainkitError(f"the study's storage {show(storage)} cannot be used: {reason}") from None


def _interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is behind `exc`: SQLAlchemy and Optuna wrap what stopped a
    statement (its `orig`, the `__cause__` or `__context__` of each wrapper)."""
    seen, waiting = set(), [exc]
    while waiting:
        exc = waiting.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        waiting += [getattr(exc, "orig", None), exc.__cause__, exc.__context__]
    return False


@contextlib.contextmanager
def quiet_failures(optuna):
    """Optuna logs a failed trial's exception with its whole traceback before re-raising it; a
    TrainkitError is the user's to fix and is said once, in one line, by the CLI."""
    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            error = record.exc_info[1] if record.exc_info else None
            if isinstance(error, TrainkitError):
                self.dropping = True
                return False
            return not (getattr(self, "dropping", False) and " failed with value " in record.getMessage())

    # On the handlers: a logger's own filters do not see what its children (optuna.study...) log.
    handlers = logging.getLogger("optuna").handlers
    drop = Drop()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def history_figure(study):
    """Optuna's optimization history, its value axis named as what the trials maximise."""
    from ..run.reports import pyplot
    pyplot()
    ax = _optuna().visualization.matplotlib.plot_optimization_history(study)
    ax.set_ylabel("validation accuracy %")      # Optuna's own label: "Objective Value"
    return ax.figure


def write_results(study, out: Path) -> Path:
    """best.yaml, history.png and importances.png in `out`; returns best.yaml's path."""
    import yaml
    optuna = _optuna()
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise TrainkitError(f"study {study.study_name!r} has no completed trial yet")
    best = study.best_trial
    config = dict(best.user_attrs["config"], progress=True)
    header = (f"# trainkit tune: the best trial of study {study.study_name!r} (trial {best.number}, "
              f"{best.value:.2f}% validation accuracy)\n# trainkit train --config {out / 'best.yaml'}\n")
    # Written as every file a command writes: whole or not at all, never through a link (outputs.py).
    write_output(out / "best.yaml", (header + yaml.safe_dump(config, sort_keys=False)).encode(), "--out")
    vis = optuna.visualization.matplotlib
    save_figure(history_figure(study), out / "history.png", "--out", bbox_inches="tight")
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        try:
            ax = vis.plot_param_importances(study)
            save_figure(ax.figure, out / "importances.png", "--out", bbox_inches="tight")
        except (RuntimeError, ValueError) as exc:  # e.g. every trial took the same values
            print(f"No parameter importances: {exc}", file=sys.stderr)
    print(f"Best: trial {best.number}, {best.value:.2f}% validation accuracy "
          f"(test {best.user_attrs.get('test_acc') or float('nan'):.2f}%): "
          + ", ".join(f"{k}={_short(v)}" for k, v in best.params.items()))
    return out / "best.yaml"


def cmd_tune(args) -> int:
    cfg, _ = config_from_args(args)
    if args.trials < 1:
        raise TrainkitError(f"--trials must be at least 1, got {args.trials}")
    space = Path(args.space)
    out = Path(args.out or Path("runs") / f"tune-{space.stem}")
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = args.study_name or space.stem
    if cfg.pretrained:
        from ..models.pretrained import prepare
        prepare(cfg.model)         # offline: one line in seconds, not a minute of retries per trial
    study = run_study(space, cfg, args.trials, storage, name, out)
    with storage_errors(storage):
        best = write_results(study, out)
    print(f"{finished(study)} trials in study {name!r}; runs, best.yaml, history.png and importances.png "
          f"in {out}/; train the best again with: trainkit train --config {best}")
    return 0


def add_command(sub) -> None:
    tune = sub.add_parser("tune", help="search settings with Optuna: validation accuracy, pruned early, resumable")
    tune.add_argument("space", metavar="SPACE.yaml", help="the search space: a setting per key, a list of choices "
                                                          "or {low, high, log, step}")
    tune.add_argument("--trials", type=number(int, "--trials"), default=20,
                      help="finished trials the study should hold, over every process sharing it (default: 20)")
    tune.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    tune.add_argument("--study-name", help="the study's name (default: the space file's name)")
    tune.add_argument("--out", help="folder of the trials' runs and the results (default: runs/tune-<space>)")
    add_recipe_flags(tune)
    add_command_flags(tune, sets={k: "every trial runs with it off" for k in TRIAL_SETTINGS})
    tune.set_defaults(func=cmd_tune)
