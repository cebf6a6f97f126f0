"""Command line: `trainkit train|summary|bench|lr-find|eval|predict|export`.

Every command is registered one way: a module's `add_command(subparsers)`, listed in COMMANDS.
Flags that mirror a setting are made from TrainConfig's fields (flags.py). Errors a user can
cause end in one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..config import flag_name, settings_that
from ..errors import TrainkitError
from .flags import Parser, add_config_flags, add_recipe_flags, config_from_args, positive


def cmd_train(args) -> int:
    from ..loop.distributed import launched_by_torchrun, restarted_by_torchrun, teardown
    from ..loop.engine import NonFiniteLoss, StopRequested
    from ..outputs import check_folder
    from ..run.resume import load_resume_config
    from ..run.rundir import FILES, default_run_dir
    from ..run.training import train

    if args.out:
        check_folder(args.out, "--out")    # a name too long or a file in the way: one line, before any work
    cfg, flags = config_from_args(args)
    restarted = restarted_by_torchrun() and args.out and (Path(args.out) / "last.pt").exists()
    if restarted:
        args.resume = args.out   # torchrun --max-restarts started us again: continue the run
    if args.resume and not restarted:
        for given, flag in ((args.config, "--config"), (args.recipe, "--recipe")):
            if given:
                raise TrainkitError(f"{flag} cannot be combined with --resume: a resumed run keeps its saved "
                                    f"settings (flags may extend --epochs or change --device and the like)")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise TrainkitError(f"--out {args.out} cannot be combined with --resume {args.resume}: "
                                f"a resumed run stays in its own folder")
    if args.resume:
        cfg = load_resume_config(Path(args.resume), flags, trust_code=args.trust_code)
    if cfg.pretrained:
        from ..models.pretrained import prepare
        prepare(cfg.model)         # offline: one line in seconds, not a minute of retries
    run_dir = Path(args.resume or args.out or default_run_dir())
    try:
        # under torchrun the agent stops and restarts workers itself: no signal handlers of ours
        result = train(cfg, out=run_dir, resume=args.resume, console=True, signals=not launched_by_torchrun())
    except StopRequested as stop:      # by SignalStop, which gives the signal's number
        name = signal.Signals(stop.reason).name
        print(f"\nStopped by {name}; a checkpoint of the unfinished epoch was written. {_resume_hint(run_dir)}",
              file=sys.stderr)
        return 128 + stop.reason
    except NonFiniteLoss as exc:
        raise TrainkitError(f"{exc}; stopped. {_resume_hint(run_dir)}", exit_code=3) from None
    finally:
        teardown()
    if result.run.rank.is_main:
        saved = [name for name in (*FILES, "checks.csv", "tensorboard") if (result.run_dir / name).exists()]
        print(f"Run saved in {result.run_dir}/: {' '.join(saved)}")
    return 0


def _resume_hint(run_dir: Path) -> str:
    from ..checkpoint import load_checkpoint

    if not (run_dir / "last.pt").exists():
        return "No checkpoint had been written yet."
    state = load_checkpoint(run_dir / "last.pt")
    where = (f"epoch {state['partial']['epoch']}, batch {state['partial']['batches']}" if state.get("partial")
             else f"end of epoch {state['epoch']}")
    return f"The last good checkpoint is {run_dir / 'last.pt'} ({where}); continue with: trainkit train --resume {run_dir}"


def cmd_summary(args) -> int:
    from ..config import parse_image_size
    from ..models import build_model, output_kind
    from ..outputs import check_output, save_figure
    from ..run.reports import plot_architecture, summary_table

    png = check_output(args.png, "--png", picture=True) if args.png else None   # before the model is built
    cfg, flags = config_from_args(args)
    if args.run_dir:                # the run's own model, channels, image size and classes
        from .inference import load_run
        trained = load_run(args.run_dir, model_spec=flags.get("model"), trust_code=args.trust_code)
        model, shape, classes, name = trained.model, trained.image_shape, len(trained.classes), trained.cfg.model
    else:
        h, w = parse_image_size(args.image_size)
        shape, classes, name = (args.channels, h, w), args.classes, cfg.model
        model = build_model(cfg.model, in_channels=args.channels, num_classes=classes)
    output_kind(model, shape, classes, name)      # a model that cannot take this shape: one line
    table = summary_table(model, shape).splitlines()
    end = next(i for i, line in enumerate(table) if line.startswith("Total params"))
    print("\n".join(table[:end + 1]))  # the per-layer table, ending with the total
    if png:
        save_figure(plot_architecture(model, shape), png, "--png")
        print(f"Architecture picture saved to {args.png}")
    return 0


def add_command(sub) -> None:
    train = sub.add_parser("train", help="train a model (the seed recipe by default)")
    add_recipe_flags(train)
    train.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    train.add_argument("--resume", metavar="RUN_DIR", help=f"continue the run in RUN_DIR from its last checkpoint; "
                       f"flags may then change {', '.join(map(flag_name, settings_that(on_resume='free')))} and "
                       f"extend {', '.join(map(flag_name, settings_that(on_resume='extend')))}, not the other settings")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    summary = sub.add_parser("summary", help="print the per-layer table of a model, or of a run's model")
    summary.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                         help="a run folder: its model, image shape and classes (the flags below are then unused)")
    add_config_flags(summary, only=("model",))
    summary.add_argument("--trust-code", action="store_true",
                         help="with RUN_DIR: import the model code its config.json names (module:factory or file.py)")
    summary.add_argument("--channels", type=positive(int, "--channels"), default=1, help="input channels (default: 1)")
    summary.add_argument("--image-size", dest="image_size", default="28",
                         help="input size, N or HxW (e.g. 32 or 48x64) (default: 28)")
    summary.add_argument("--classes", type=positive(int, "--classes"), default=10, help="classes (default: 10)")
    summary.add_argument("--png", help="also save a picture of the network to this file")
    summary.set_defaults(func=cmd_summary)


def build_parser() -> Parser:
    from . import bench, compare, inference, lr_find, predict, serve, tune

    parser = Parser(prog="trainkit", description="Train image classifiers; the defaults train the seed's MNIST network.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (sys.modules[__name__], bench, lr_find, inference, predict, compare, tune, serve):   # COMMANDS
        module.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except TrainkitError as exc:
        print(f"trainkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("trainkit: interrupted", file=sys.stderr)
        return 130
