"""Command line: `trainkit train|summary|bench|lr-find|eval|predict|export`.

The train flags are made from the fields of TrainConfig, so each setting is declared once.
Errors a user can cause end in one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .config import RECIPES, TrainConfig, field_specs, from_mapping, load_config_file
from .errors import TrainkitError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise TrainkitError(f"{message} (see {self.prog} --help)")


def _number(kind, name):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig field; a flag left out keeps the recipe's / file's value."""
    for f in field_specs():
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type.split(" ")[0] if isinstance(f.type, str) else f.type.__name__
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parse = {"int": _number(int, f.name.replace("_", "-")),
                     "float": _number(float, f.name.replace("_", "-"))}.get(kind, str)
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, choices=f.metadata["choices"],
                                help=help_text, metavar=None if f.metadata["choices"] else kind.upper())


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """Defaults < --recipe < --config file < flags. Returns the config and the explicit flags."""
    names = {f.name for f in field_specs()}
    flags = {k: v for k, v in vars(args).items() if k in names}
    cfg = TrainConfig().replace(**RECIPES[args.recipe])
    if args.config:
        cfg = from_mapping(load_config_file(args.config), cfg)
    return cfg.replace(**flags), flags


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the training loop stops at the next step boundary."""

    def __init__(self):
        self.signum = None

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


def cmd_train(args) -> int:
    from .engine import NonFiniteLoss, StopRequested
    from .reports import ConsoleLogger
    from .distributed import launched_by_torchrun, restarted_by_torchrun, teardown
    from .run import default_run_dir, load_resume_config, train

    cfg, flags = config_from_args(args)
    if restarted_by_torchrun() and args.out and (Path(args.out) / "last.pt").exists():
        args.resume = args.out   # torchrun --max-restarts started us again: continue the run
    if args.resume:
        cfg = load_resume_config(Path(args.resume), flags)
    run_dir = Path(args.resume or args.out or default_run_dir())
    stop = _StopFlag()
    if not launched_by_torchrun():  # under torchrun the agent stops and restarts workers itself
        stop.install()
    try:
        result = train(cfg, out=run_dir, resume=args.resume, logger=ConsoleLogger(cfg.progress),
                       should_stop=stop)
    except StopRequested:
        name = signal.Signals(stop.signum).name
        print(f"\nStopped by {name}; a checkpoint of the unfinished epoch was written. {_resume_hint(run_dir)}",
              file=sys.stderr)
        return 128 + stop.signum
    except NonFiniteLoss as exc:
        raise TrainkitError(f"{exc}; stopped. {_resume_hint(run_dir)}", exit_code=3) from None
    finally:
        teardown()
    if not result.experiment.rank.is_main:
        return 0
    print(f"Run saved in {result.run_dir}/: config.json metrics.csv plot.png samples.png confusion.png "
          f"mistakes.png model.pt summary.txt last.pt best.pt")
    return 0


def _resume_hint(run_dir: Path) -> str:
    from .checkpoint import load_checkpoint

    if not (run_dir / "last.pt").exists():
        return "No checkpoint had been written yet."
    state = load_checkpoint(run_dir / "last.pt")
    where = (f"epoch {state['partial']['epoch']}, batch {state['partial']['batches']}" if state.get("partial")
             else f"end of epoch {state['epoch']}")
    return f"The last good checkpoint is {run_dir / 'last.pt'} ({where}); continue with: trainkit train --resume {run_dir}"


def cmd_summary(args) -> int:
    from .models import build_model
    from .reports import model_summary, plot_architecture

    shape = (args.channels, args.size, args.size)
    model = build_model(args.model, in_channels=args.channels, num_classes=args.classes)
    table = str(model_summary(model, shape)).splitlines()
    end = next(i for i, line in enumerate(table) if line.startswith("Total params"))
    print("\n".join(table[:end + 1]))  # the per-layer table, ending with the total
    if args.png:
        plot_architecture(model, shape, Path(args.png))
        print(f"Architecture picture saved to {args.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trainkit", description="Train image classifiers; the defaults train the seed's MNIST network.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model (the seed recipe by default)")
    train.add_argument("--recipe", choices=sorted(RECIPES), default="seed", help="named set of defaults (default: seed)")
    train.add_argument("--config", help="YAML, TOML or JSON file of settings (a run's config.json works); flags override it")
    train.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    add_config_flags(train)
    train.set_defaults(func=cmd_train)

    summary = sub.add_parser("summary", help="print the per-layer table of a model")
    summary.add_argument("--model", default="s5net")
    summary.add_argument("--channels", type=_number(int, "channels"), default=1)
    summary.add_argument("--size", type=_number(int, "size"), default=28)
    summary.add_argument("--classes", type=_number(int, "classes"), default=10)
    summary.add_argument("--png", help="also save a picture of the network to this file")
    summary.set_defaults(func=cmd_summary)

    from . import bench, inference, lr_find
    bench.add_command(sub)
    lr_find.add_command(sub)
    inference.add_commands(sub)
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
