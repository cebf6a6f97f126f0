"""`trainkit compare RUN_DIR...`: runs side by side, from their run folders (no MLflow needed).

A table of each run's final and best accuracy, epochs and wall time, with only the settings
that differ between them, and compare.png: held-out accuracy and loss against epoch and
against wall time. Runs with a validation split are drawn on it (their test set is evaluated
once, at the end); the others on the test set.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .config import load_config_file
from .errors import TrainkitError

IGNORED = {"progress", "workers", "data_dir"}   # settings that never change what a run computes


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
    return {"name": path.name or str(path), "path": path, "config": config, "rows": rows}


def held_out(run: dict) -> str:
    """"val" for a run with a validation split, else "test"."""
    return "val" if run["rows"][0].get("val_acc") is not None else "test"


def differing_settings(runs: list[dict]) -> list[str]:
    names = sorted({k for run in runs for k in run["config"]} - IGNORED)
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
        cells = [run["name"], rows[-1].get("test_acc"), rows[-1].get("val_acc"), max(accs), split, len(rows),
                 sum(r["seconds"] for r in rows)]
        settings = [f"{v:.4g}" if isinstance(v, float) else show(v) for v in (run["config"].get(k) for k in differ)]
        lines.append("| " + " | ".join([*(show(c) for c in cells), *settings]) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path | None = None):
    """2x2: held-out accuracy and loss against epoch (top) and against wall time (bottom);
    the figure, or saved to `path` (and closed)."""
    from .reports import _finish, _pyplot

    plt = _pyplot()
    fig, axs = plt.subplots(2, 2, figsize=(14, 9))
    for run in runs:
        split, rows = held_out(run), run["rows"]
        epochs = [r["epoch"] for r in rows]
        wall, total = [], 0.0
        for r in rows:
            total += r["seconds"]
            wall.append(total)
        label = f"{run['name']} ({split})"
        for col, key in enumerate(("acc", "loss")):
            values = [r[f"{split}_{key}"] for r in rows]
            axs[0, col].plot(epochs, values, marker="o", label=label)
            axs[1, col].plot(wall, values, marker="o", label=label)
    for col, key in enumerate(("accuracy %", "loss")):
        axs[0, col].set_xlabel("epoch")
        axs[1, col].set_xlabel("wall time (s)")
        for row in (0, 1):
            axs[row, col].set_ylabel(f"held-out {key}")
            axs[row, col].grid(alpha=0.3)
    axs[0, 0].legend(fontsize=8)
    fig.suptitle("held-out accuracy and loss: validation split where a run has one, else the test set")
    fig.tight_layout()
    return _finish(fig, path)


def cmd_compare(args) -> int:
    from .outputs import check_output, save_figure

    png = check_output(args.png, "--png", picture=True)   # before the runs are read
    runs = [load_run(Path(p)) for p in args.run_dirs]
    print(table(runs))
    save_figure(plot(runs), png, "--png")
    print(f"Curves saved to {args.png}")
    return 0


def add_command(sub) -> None:
    cmp = sub.add_parser("compare", help="compare runs: a table of results and differing settings, and compare.png")
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--png", default="compare.png", help="where to save the curves (default: compare.png)")
    cmp.set_defaults(func=cmd_compare)
