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

import sys
import time
import warnings
from pathlib import Path

from .config import TrainConfig, field_specs, from_mapping, kind_of, load_config_file, show, validate
from .engine import Callback, TrainState
from .errors import TrainkitError
from .flags import add_config_flags, add_recipe_flags, config_from_args, number

DEFAULT_VAL_SPLIT = 0.1
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
            if not low < high:
                raise TrainkitError(f"search space {path}: {name} needs low < high, got {low} and {high}")
            space[name] = ("range", kind, low, high, bool(spec.get("log", False)), spec.get("step"))
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
                values[name] = trial.suggest_int(name, low, high, step=int(step or 1), log=log)
            else:
                values[name] = trial.suggest_float(name, low, high, step=step, log=log)
    return values


# ---------------------------------------------------------------------------------------------
# Trials

class TrialPruning(Callback):
    """Reports every validation check to the trial and stops the run when the pruner says so;
    `tune` then marks the trial pruned. The step is the epoch fraction trained, in thousandths
    (1500: half-way through the second epoch), so trials with different batch sizes are compared
    after the same number of training images; `images` is that number when it stopped."""

    def __init__(self, trial, evals_per_epoch: int, batch_size: int, epochs: int):
        self.trial, self.evals_per_epoch, self.batch_size, self.epochs = trial, evals_per_epoch, batch_size, epochs
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
            done = sum(r.train_seen for r in state.history if r.epoch < e.epoch)
            self.images = done + (e.after_batch if e.after_batch is not None else state.num_batches) * self.batch_size
            state.stop()


def make_pruner():
    """The median of the finished trials at the same step, from the third trial on. Warm-up: no
    pruning before a trial's first full evaluation (the end of its first epoch); its first checks
    say little (30.8% against 35.8% once pruned a trial that went on to 76.5%)."""
    return _optuna().pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=PER_EPOCH)


def trial_config(base: TrainConfig, values: dict) -> TrainConfig:
    cfg = base.replace(**values, progress=False, mlflow=None, mlflow_register=None)
    if cfg.val_split is None:
        cfg = cfg.replace(val_split=DEFAULT_VAL_SPLIT)
    return validate(cfg)


def finished(study) -> int:
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_study(space_path: Path, base: TrainConfig, trials: int, storage: str, study_name: str, out: Path):
    """Run trials until the study holds `trials` finished ones; returns the study."""
    optuna = _optuna()
    from .run import train

    space = load_space(space_path, base)
    out.mkdir(parents=True, exist_ok=True)
    # A trial whose process was killed stays RUNNING; the heartbeat lets the next process fail it.
    storage_obj = optuna.storages.RDBStorage(storage, heartbeat_interval=10, grace_period=30) \
        if storage.startswith(("sqlite", "postgresql", "mysql")) else storage
    pruner = make_pruner()
    study = optuna.create_study(storage=storage_obj, study_name=study_name, direction="maximize",
                                pruner=pruner, load_if_exists=True)
    study.set_user_attr("space", str(space_path))

    def objective(trial):
        cfg = trial_config(base, suggest(trial, space))
        run_dir = out / f"trial-{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        pruning = TrialPruning(trial, cfg.evals_per_epoch, cfg.batch_size, cfg.epochs)
        start = time.perf_counter()
        result = train(cfg, out=run_dir, callbacks=[pruning])
        last = result.history[-1]
        # what the trial ran in: --precision and --channels-last auto resolved (config.json's)
        trial.set_user_attr("config", result.experiment.cfg.to_dict())
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
        study.optimize(objective, callbacks=[enough], catch=())
    return study


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


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
    (out / "best.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    from .reports import _pyplot
    plt = _pyplot()
    vis = optuna.visualization.matplotlib
    ax = vis.plot_optimization_history(study)
    ax.figure.savefig(out / "history.png", dpi=80, bbox_inches="tight")
    plt.close(ax.figure)
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        try:
            ax = vis.plot_param_importances(study)
            ax.figure.savefig(out / "importances.png", dpi=80, bbox_inches="tight")
            plt.close(ax.figure)
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
    out.mkdir(parents=True, exist_ok=True)
    study = run_study(space, cfg, args.trials, storage, name, out)
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
    add_config_flags(tune, skip=("mlflow", "progress"))
    tune.set_defaults(func=cmd_tune)
