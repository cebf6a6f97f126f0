"""`trainkit lr-find`: sweep the learning rate upwards over a few hundred steps and plot the loss.

The learning rate grows geometrically from `start_lr` to `end_lr`; the sweep stops early once
the smoothed loss exceeds four times its best. The suggestion is the rate where the smoothed
loss falls fastest (the steepest negative slope against log lr), a common rule of thumb.

The sweep is a Run built as `train` builds one (assembly.build_run), with the callbacks of a
training step: --clip-grad-norm clips its steps as it would clip training's. A flag for a callback
that acts on epochs, a run folder or a tracking store (--mlflow, --final, ...) is refused in one line
(flags.add_command_flags: lr-find offers the flags of the parts it runs).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..config import TrainConfig
from ..errors import TrainkitError
from ..loop.engine import TrainState, emit, train_step
from ..run.assembly import build_run
from .flags import add_command_flags, add_recipe_flags, config_from_args, positive


def lr_sweep(cfg: TrainConfig, steps: int = 200, start_lr: float = 1e-5, end_lr: float = 1.0,
             data=None) -> tuple[list[float], list[float], float]:
    """Returns (learning rates, smoothed losses, suggested learning rate). The model is thrown away."""
    if cfg.compile == "auto":   # `steps` steps, not the epochs auto would weigh a compile against
        cfg = cfg.replace(compile="off")
    run = build_run(cfg, data=data, steps_only=True)    # its callbacks: those of a step (--clip-grad-norm)
    state = TrainState(run.train_model, run.optimizer, None, run.train_loader, None, run.device, run.amp_dtype,
                       run.callbacks, num_batches=len(run.train_loader))
    after_backward = (lambda: emit(run.callbacks, "on_after_backward", state)) if run.callbacks else None
    factor = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, losses = [], []
    smoothed, best = 0.0, math.inf
    step = 0
    emit(run.callbacks, "on_fit_start", state)
    run.train_model.train()
    while step < steps:
        for x, y in run.train_loader:
            lr = start_lr * factor ** step
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(run.device), y.to(run.device)
            loss, _ = train_step(run.train_model, x, y, run.optimizer, run.loss_fn, amp_dtype=run.amp_dtype,
                                 after_backward=after_backward)
            value = loss.item()
            smoothed = 0.9 * smoothed + 0.1 * value if step else value   # exponential moving average
            lrs.append(lr)
            losses.append(smoothed)
            step += 1
            if not math.isfinite(value) or smoothed > 4 * best or step >= steps:
                step = steps
                break
            best = min(best, smoothed)
    return lrs, losses, suggest(lrs, losses)


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The learning rate at the steepest descent of the loss against log lr (before the minimum)."""
    stop = max(range(len(losses)), key=lambda i: -losses[i]) + 1 if losses else 0
    logs = [math.log10(lr) for lr in lrs[:stop]]
    if len(logs) < 3:
        return lrs[0] if lrs else float("nan")
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(logs) - 1)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def plot(lrs, losses, suggestion: float, path: Path | None = None):
    from ..run.reports import pyplot, save_figure_to

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Learning-rate finder")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure_to(fig, path)


def cmd_lr_find(args) -> int:
    if not args.start_lr < args.end_lr:
        raise TrainkitError(f"--end-lr ({args.end_lr}) must be greater than --start-lr ({args.start_lr})")
    from ..outputs import check_output, save_figure

    output = check_output(args.output, "--output", picture=True)   # before the sweep
    cfg, _ = config_from_args(args)     # a flag of a part lr-find does not run was refused by its parser
    lrs, losses, suggestion = lr_sweep(cfg, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    save_figure(plot(lrs, losses, suggestion, None), output, "--output")
    print(f"Swept {len(lrs)} steps from lr {lrs[0]:.1e} to {lrs[-1]:.1e}; plot saved to {args.output}")
    print(f"Suggested lr: {suggestion:.2e}")
    return 0


def add_command(sub) -> None:
    finder = sub.add_parser("lr-find", help="sweep the learning rate and suggest one")
    add_recipe_flags(finder)
    finder.add_argument("--steps", type=positive(int, "--steps"), default=200, help="steps in the sweep (default: 200)")
    finder.add_argument("--start-lr", type=positive(float, "--start-lr"), default=1e-5)
    finder.add_argument("--end-lr", type=positive(float, "--end-lr"), default=1.0)
    finder.add_argument("--output", default="lr_find.png", help="where to save the plot (default: lr_find.png)")
    # Training steps at a swept rate: no schedule, no epochs, no tracking.
    add_command_flags(finder, runs=("data", "model", "step", "console"),
                      sets={"lr": "the sweep sets it, from --start-lr to --end-lr"})
    finder.set_defaults(func=cmd_lr_find)
