"""`trainkit compare RUN_DIR...`: runs side by side, from their run folders (no MLflow needed).

A table of each run's final and best accuracy, epochs and wall time, with only the settings
that differ between them (one column each), and compare.png: held-out accuracy and loss against
epoch and against wall time, mid-epoch checks (checks.csv) included as small points. Runs with a
validation split are drawn on it (their test set is evaluated once, at the end); the others on the
test set. Each run is named by the shortest end of its path that no other run's path shares. A
run stopped part way through an epoch (a pruned trial, --target-acc at a mid-epoch check) is shown
at the epochs it trained (1.5), marked as stopped.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..config import load_config_file, settings_that
from ..errors import TrainkitError

SHOWN = {"epochs"}      # settings the table shows in a result column of their own (epochs: "2 of 20")


def _number(text: str) -> float | None:
    return float(text) if text not in ("", None) else None


def load_run(path: Path) -> dict:
    """A run folder's settings and per-epoch rows: {"name", "config", "rows"}."""
    path = Path(path)
    for name in ("config.json", "metrics.csv"):
        if not (path / name).is_file():
            raise TrainkitError(f"{path} is not a finished run folder: it has no {name}")
    try:
        config = load_config_file(path / "config.json")    # one line for a file that is empty, not JSON, huge...
        with open(path / "metrics.csv", newline="") as f:
            raw = list(csv.DictReader(f))
        long = next((i for i, row in enumerate(raw, 1) if None in row), None)
        if long is not None:
            raise TrainkitError(f"{path / 'metrics.csv'} is damaged: row {long} has more values than the header")
        rows = [{k: _number(v) for k, v in row.items()} for row in raw]
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TrainkitError(f"cannot read the run in {path}: {type(exc).__name__}: {reason}") from None
    if not rows:
        raise TrainkitError(f"{path} has no finished epoch in metrics.csv")
    split = "val" if rows[0].get("val_acc") is not None else "test"
    for number, row in enumerate(rows, 1):
        missing = [c for c in ("epoch", "seconds", f"{split}_acc", f"{split}_loss") if row.get(c) is None]
        if missing:
            raise TrainkitError(f"{path / 'metrics.csv'} is damaged: row {number} has no {', '.join(missing)}")
    return {"name": path.name or str(path), "path": path, "config": config, "rows": rows, "checks": _checks(path),
            "per_epoch": images_per_epoch(path)}


def images_per_epoch(path: Path) -> int | None:
    """The training images of a whole epoch (config.json's data.train_size), which tells an epoch
    stopped part way from a whole one; None when config.json does not say."""
    try:
        size = json.loads((path / "config.json").read_text()).get("data", {}).get("train_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def trained(run: dict) -> list[float]:
    """Where each of the run's epochs ended, in epochs: 1.5 for a second epoch stopped half-way."""
    from ..run.reports import epochs_trained
    return [epochs_trained(int(r["epoch"]), r.get("train_seen"), run["per_epoch"]) for r in run["rows"]]


def stopped(run: dict) -> bool:
    """Whether the run's last epoch was stopped part way (pruned, --target-acc at a check)."""
    return trained(run)[-1] < run["rows"][-1]["epoch"]


def _checks(path: Path) -> list[dict]:
    """The run's mid-epoch checks (checks.csv), one per (epoch, batch): a check made again after a
    resume replaces the first. None recorded, or an unreadable file: no checks drawn."""
    if not (path / "checks.csv").is_file():
        return []
    try:
        with open(path / "checks.csv", newline="") as f:
            found = {(int(r["epoch"]), int(r["after_batch"])): {
                "epoch": int(r["epoch"]), "after_batch": int(r["after_batch"]), "batches": int(r["batches"]),
                "split": r["split"], "loss": float(r["loss"]), "acc": float(r["acc"]),
                "seconds": float(r["seconds"])} for r in csv.DictReader(f)}
    except (OSError, ValueError, KeyError, TypeError, csv.Error):
        return []
    return [found[k] for k in sorted(found)]


def labels(paths: list[Path]) -> list[str]:
    """Each run's name: the shortest end of its path (`run`, `a/run`) that no other run's ends in."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, mine in enumerate(parts):
        others = [theirs for j, theirs in enumerate(parts) if j != i and theirs != mine]
        k = 1
        while k < len(mine) and any(theirs[-k:] == mine[-k:] for theirs in others):
            k += 1
        names.append(str(Path(*mine[-k:])))
    return names


def held_out(run: dict) -> str:
    """"val" for a run with a validation split, else "test"."""
    return "val" if run["rows"][0].get("val_acc") is not None else "test"


def differing_settings(runs: list[dict]) -> list[str]:
    """The settings that differ between the runs and change what a run computes (its `computes` fact)."""
    names = sorted({k for run in runs for k in run["config"]} - set(settings_that(computes=False)) - SHOWN)
    return [k for k in names if len({json.dumps(run["config"].get(k)) for run in runs}) > 1]


def table(runs: list[dict]) -> str:
    """A markdown table: one row per run."""
    differ = differing_settings(runs)
    header = ["run", "final test %", "final val %", "best %", "split", "epochs", "wall s", *differ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" ---: " for _ in header) + "|"]
    show = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
    for run in runs:
        rows, split = run["rows"], held_out(run)
        accs = [r[f"{split}_acc"] for r in rows if r.get(f"{split}_acc") is not None]
        planned, done = run["config"].get("epochs"), trained(run)[-1]
        epochs = f"{done:.3g}" + ("" if planned in (None, done) else f" of {planned}") + \
            (" (stopped)" if stopped(run) else "")
        cells = [run["name"], rows[-1].get("test_acc"), rows[-1].get("val_acc"), max(accs), split, epochs,
                 sum(r["seconds"] for r in rows)]
        settings = [f"{v:.4g}" if isinstance(v, float) else show(v) for v in (run["config"].get(k) for k in differ)]
        lines.append("| " + " | ".join([*(show(c) for c in cells), *settings]) + " |")
    return "\n".join(lines)


def curve(run: dict) -> tuple[list[tuple], list[tuple]]:
    """The run's held-out points (epoch, wall seconds, accuracy, loss): at the epochs' ends, and at
    its mid-epoch checks (epoch 1.5: half-way through the second)."""
    split, rows = held_out(run), run["rows"]
    started, total = {}, 0.0            # wall time at each epoch's start
    for r in rows:
        started[int(r["epoch"])] = total
        total += r["seconds"]
    ends = [(x, started[int(r["epoch"])] + r["seconds"], r[f"{split}_acc"], r[f"{split}_loss"])
            for x, r in zip(trained(run), rows)]
    checks = [(c["epoch"] - 1 + c["after_batch"] / c["batches"], started.get(c["epoch"], total) + c["seconds"],
               c["acc"], c["loss"]) for c in run["checks"] if c["split"] == split]
    return ends, checks


def plot(runs: list[dict], path: Path | None = None):
    """2x2: held-out accuracy and loss against epoch (top) and against wall time (bottom);
    the figure, or saved to `path` (and closed)."""
    from ..run.reports import mark_stopped, pyplot, save_figure_to, whole_epochs

    plt = pyplot()
    fig, axs = plt.subplots(2, 2, figsize=(14, 9))
    for run in runs:
        split = held_out(run)
        ends, checks = curve(run)
        points = sorted(ends + checks)     # one curve through the checks and the epochs' ends
        label = f"{run['name']} ({split})"
        for col, key in enumerate(("acc", "loss")):
            for row, x in enumerate(("epoch", "wall")):
                pick = lambda pts: ([p[row] for p in pts], [p[2 + col] for p in pts])
                line, = axs[row, col].plot(*pick(points), label=label)
                axs[row, col].plot(*pick(ends), "o", color=line.get_color())
                if checks:
                    axs[row, col].plot(*pick(checks), ".", color=line.get_color(), markersize=5)
                if stopped(run):     # named once, in the legend's panel
                    mark_stopped(axs[row, col], *(v[0] for v in pick(ends[-1:])),
                                 f"{run['name']} stopped at epoch {ends[-1][0]:.3g}" if row == col == 0 else "_")
    for col, key in enumerate(("accuracy %", "loss")):
        axs[0, col].set_xlabel("epoch")
        whole_epochs(axs[0, col])
        axs[1, col].set_xlabel("wall time (s)")
        for row in (0, 1):
            axs[row, col].set_ylabel(f"held-out {key}")
            axs[row, col].grid(alpha=0.3)
    axs[0, 0].legend(fontsize=8)
    fig.suptitle("held-out accuracy and loss: validation split where a run has one, else the test set\n"
                 "(large points: the epochs' ends; small: mid-epoch checks; a cross: a run stopped part way "
                 "through an epoch)")
    fig.tight_layout()
    return save_figure_to(fig, path)


def cmd_compare(args) -> int:
    from ..outputs import check_output, save_figure

    png = check_output(args.png, "--png", picture=True)   # before the runs are read
    runs = [load_run(Path(p)) for p in args.run_dirs]
    for run, name in zip(runs, labels([run["path"] for run in runs])):
        run["name"] = name
    print(table(runs))
    save_figure(plot(runs), png, "--png")
    print(f"Curves saved to {args.png}")
    return 0


def add_command(sub) -> None:
    cmp = sub.add_parser("compare", help="compare runs: a table of results and differing settings, and compare.png")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--png", default="compare.png", help="where to save the curves (default: compare.png)")
    cmp.set_defaults(func=cmd_compare)
