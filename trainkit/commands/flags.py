"""Command-line flags made from TrainConfig's fields, shared by every command that mirrors a setting.

No command module imports another: each one takes what it needs from here.
"""
from __future__ import annotations

import argparse
from typing import Iterable, Mapping

from ..config import (PARTS, RECIPES, TrainConfig, field_specs, flag_name, from_mapping, kind_of, load_config_file,
                     settings_that)
from ..errors import TrainkitError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise TrainkitError(f"{message} (see {self.prog} --help)")


def number(kind, flag: str):
    """An argparse type that says which flag (`--steps`) wanted an integer or a number."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def positive(kind, flag: str):
    """Like `number`, and the value must be greater than 0 (counts, sizes, rates)."""
    parse_number = number(kind, flag)

    def parse(text: str):
        value = parse_number(text)
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be greater than 0 (and finite), got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _registered_names(kind: str) -> str:
    from ..data import DATASETS
    from ..models import MODELS
    from ..loop.optim import OPTIMIZERS, SCHEDULERS

    registry = {"model": MODELS, "dataset": DATASETS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}[kind]
    return ", ".join(registry)


def add_config_flags(parser: argparse.ArgumentParser, only: Iterable[str] | None = None,
                     skip: Iterable[str] = ()) -> None:
    """One flag per TrainConfig field (or those in `only`); a flag left out keeps the recipe's /
    file's value, so flags are absent from the parsed arguments unless given."""
    only, skip = set(only) if only is not None else None, set(skip)
    for f in field_specs():
        if f.name in skip or (only is not None and f.name not in only):
            continue
        kind = f.type.split(" ")[0] if isinstance(f.type, str) else f.type.__name__
        help_text = f.metadata["help"]
        if f.metadata.get("registry"):
            help_text += f"; registered: {_registered_names(f.metadata['registry'])}"
        env = f.metadata["env"]
        help_text += f" (default: ${env}, else {f.metadata['fallback']})" if env else f" (default: {f.default})"
        flag = flag_name(f.name)
        if f.name == "mlflow":   # a flag whose value may be left out: --mlflow [URI]
            parser.add_argument(flag, nargs="?", const="auto", default=argparse.SUPPRESS, metavar="URI",
                                help=help_text)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        elif "on" in (f.metadata["choices"] or ()):   # --compile alone: on (the flag was a switch once)
            parser.add_argument(flag, nargs="?", const="on", default=argparse.SUPPRESS,
                                choices=f.metadata["choices"], help=help_text)
        else:
            parse = {"int": number(int, flag), "float": number(float, flag)}.get(kind, str)
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS,
                                choices=f.metadata["choices"], help=help_text,
                                metavar=None if f.metadata["choices"] else kind.upper())


class _Refused(argparse.Action):
    """A setting's flag that the command does not take: given, it is one line saying why."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        raise TrainkitError(f"{parser.prog.split()[-1]} does not take {option_string}: {self.reason}")


def add_command_flags(parser: argparse.ArgumentParser, runs: Iterable[str] = PARTS,
                      sets: Mapping[str, str] | None = None) -> None:
    """The flags of the settings a command honours: those read by the parts of a run it runs (`runs`,
    config.PARTS), less those it sets itself (`sets`: setting -> how). Any other setting's flag is
    refused in one line that says why, rather than taken and ignored."""
    runs, sets = tuple(runs), dict(sets or {})
    unknown = set(runs) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts of a run: {', '.join(sorted(unknown))}")
    taken = [name for name in settings_that(part=runs) if name not in sets]
    add_config_flags(parser, only=taken)
    for f in field_specs():
        if f.name in taken:
            continue
        part = f.metadata["part"]
        reason = sets.get(f.name) or f"it is a setting of the run's {part} ({PARTS[part]}), which it does not run"
        flags = [flag_name(f.name)] + ([f"--no-{flag_name(f.name)[2:]}"] if kind_of(f) == "bool" else [])
        parser.add_argument(*flags, dest=f"refused_{f.name}", action=_Refused, reason=reason)


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="named set of defaults (default: seed)")
    parser.add_argument("--config", help="YAML, TOML or JSON file of settings (a run's config.json works); "
                                         "flags override it")
    parser.add_argument("--trust-code", action="store_true",
                        help="import the model code (module:factory or file.py) that a run's config.json names, "
                             "with --config or --resume; a file only while its sha256 is the recorded one")


def config_flags(args: argparse.Namespace) -> dict:
    """The settings given as flags."""
    names = {f.name for f in field_specs()}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """Defaults < --recipe < --config file < flags. Returns the config and the explicit flags."""
    flags = config_flags(args)
    cfg = TrainConfig().replace(**RECIPES[getattr(args, "recipe", None) or "seed"])
    if getattr(args, "config", None):
        cfg = from_mapping(load_config_file(args.config), cfg)
        record = run_record(args.config)
        if record is not None and "model" not in flags:   # a file trainkit wrote: its model passes the gate
            from ..models import gated_model_name
            gated_model_name(str(args.config), cfg.model, record.get("model"),
                             trust_code=getattr(args, "trust_code", False))
    return cfg.replace(**flags), flags


def run_record(path) -> dict | None:
    """The whole of a run's config.json (settings, environment, data, model) when `path` is one, else
    None: a config file a person wrote names their own code, one trainkit wrote is data."""
    import json
    try:
        saved = json.loads(open(path, encoding="utf-8").read())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "config" in saved and "environment" in saved else None
