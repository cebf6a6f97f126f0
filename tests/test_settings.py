"""Settings that carry their own facts: every TrainConfig field says whether it changes what a run
computes, what `--resume` may do with it, which part of a run reads it and which environment
variable gives its default; `--resume`, `compare`, `lr-find`, `tune`, the help and docs/settings.md
read them there. Registry entries carry theirs (a schedule's fixed length)."""
import argparse
import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_one_line_error, cli_ok, run_cli
from trainkit import checkpoint as ckpt
from trainkit import config
from trainkit.commands.cli import build_parser, main
from trainkit.commands.compare import SHOWN, differing_settings
from trainkit.commands.flags import add_command_flags, add_config_flags
from trainkit.commands.tune import TRIAL_SETTINGS, load_space
from trainkit.config import (ENVIRONMENT, ON_RESUME, PARTS, TrainConfig, _opt, fact, field_specs, flag_name,
                             may_change_on_resume, resolve_data_dir, settings_that)
from trainkit.errors import TrainkitError
from trainkit.loop.optim import SCHEDULERS
from trainkit.registry import Registry
from trainkit.run.resume import load_resume_config

NAMES = [f.name for f in field_specs()]


def another_value(f: dataclasses.Field):
    """A valid value of the setting other than its default."""
    meta, kind, default = f.metadata, config.kind_of(f), f.default
    if meta["registry"]:
        from trainkit.commands.flags import _registered_names
        return next(n for n in _registered_names(meta["registry"]).split(", ") if n != default)
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != default)
    if kind == "bool":
        return not default
    if kind == "int":
        return (default or 1) + 1
    if kind == "float":
        return default / 2 if default else 0.5
    return {"image_size": "32", "device": "cpu"}.get(f.name, "elsewhere")


def make_run_folder(path: Path, **settings) -> Path:
    """A run folder as `train` leaves it after its first epoch: config.json and last.pt (real files
    in their own formats; the weights are not needed to check the settings)."""
    path.mkdir(parents=True)
    cfg = TrainConfig(**settings)
    record = {"config": cfg.to_dict(), "environment": {}, "model": {"kind": "registry", "name": cfg.model}}
    (path / "config.json").write_text(json.dumps(record))
    state = {"format": ckpt.FORMAT, "epoch": 1, "model": {}, "optimizer": {}, "rng": {}, "history": [],
             "config": cfg.to_dict()}
    ckpt.atomic_write_bytes(path / "last.pt", ckpt.checkpoint_bytes(state))
    return path


# ---------------------------------------------------------------------------------------------
# The facts

def test_every_setting_carries_its_facts():
    for f in field_specs():
        meta = f.metadata
        assert meta["help"] and meta["part"] in PARTS and meta["on_resume"] in ON_RESUME, f.name
        assert isinstance(meta["computes"], bool), f.name
        assert meta["env"] is None or (meta["env"].startswith("TRAINKIT_") and f.default is None
                                       and meta["fallback"] is not None), f.name


def test_the_settings_that_do_not_compute_and_those_a_resume_may_change():
    # Device and workers compute (other kernels; the torchvision pipeline's per-worker seeds) yet a
    # resumed run may move to another machine; MLflow computes nothing, but a resumed run continues
    # the MLflow run of its saved URI.
    quiet = settings_that(computes=False)
    assert {"data_dir", "tensorboard", "mlflow", "mlflow_register", "progress"} <= set(quiet)
    assert not {"device", "workers", "seed", "lr", "precision", "compile", "evals_per_epoch"} & set(quiet)
    assert {"data_dir", "device", "workers", "tensorboard", "progress", "epochs"} <= may_change_on_resume()
    assert not {"mlflow", "mlflow_register", "seed", "lr", "scheduler", "precision"} & may_change_on_resume()
    assert fact("epochs", "on_resume") == "extend" and fact("data_dir", "env") == "TRAINKIT_DATA_DIR"
    with pytest.raises(TrainkitError, match="unknown setting 'no_such_setting'"):
        fact("no_such_setting", "computes")


@pytest.mark.slow
def test_workers_computes_the_torchvision_pipelines_augmentation():
    """Why `workers` computes: DataLoader seeds each worker on its own and deals them the batches
    in turn, so another count draws other augmentations from the same seed."""
    from trainkit.data.loaders import torchvision_loader
    images = (torch.arange(32 * 28 * 28) % 251).to(torch.uint8).reshape(32, 1, 28, 28)
    labels = torch.zeros(32, dtype=torch.int64)
    drawn = {workers: torch.cat([x for x, _ in torchvision_loader(images, labels, 8, mean=(0.5,), std=(0.5,),
                                                                  train=True, seed=1, workers=workers)])
             for workers in (1, 2)}
    assert not torch.equal(drawn[1], drawn[2])
    assert fact("workers", "computes") and fact("workers", "on_resume") == "free"


def test_a_setting_with_an_unknown_part_or_resume_rule_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match="part 'epochs'"):
        _opt(1, "a setting", part="epochs")
    with pytest.raises(ValueError, match="on_resume 'sometimes'"):
        _opt(1, "a setting", part="loop", on_resume="sometimes")


def test_the_data_folder_default_is_its_environment_variable_else_data(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(TrainConfig()) == tmp_path
    assert resolve_data_dir(TrainConfig(data_dir="mine")) == Path("mine")      # a setting given wins
    assert resolve_data_dir(TrainConfig(data_dir="")) == tmp_path               # --data-dir "": not given
    monkeypatch.setenv("TRAINKIT_DATA_DIR", "")
    assert resolve_data_dir(TrainConfig()) == Path("data")
    monkeypatch.delenv("TRAINKIT_DATA_DIR")
    assert resolve_data_dir(TrainConfig()) == Path("data")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert re.search(r"--data-dir STR\s+data folder \(default: \$TRAINKIT_DATA_DIR, else data\)", capsys.readouterr().out)


def test_every_environment_variable_trainkit_reads_is_declared_once():
    read = {name for path in (ROOT / "trainkit").rglob("*.py")
            for name in re.findall(r"TRAINKIT_[A-Z_]*[A-Z]", path.read_text())}
    own = {f.metadata["env"] for f in field_specs() if f.metadata["env"]}
    assert read == set(ENVIRONMENT) | own
    assert not set(ENVIRONMENT) & own
    for name, (module, _) in ENVIRONMENT.items():      # the module named reads it (wherever it lies)
        assert any(name in path.read_text() for path in (ROOT / "trainkit").rglob(module)), (name, module)


def test_docs_settings_md_is_the_table_of_trainconfig():
    text = (ROOT / "docs" / "settings.md").read_text()
    assert text == config.settings_markdown(), "run: python scripts/make_settings_doc.py"
    assert all(f"| {name} | `{flag_name(name)}` |" in text for name in NAMES)


# ---------------------------------------------------------------------------------------------
# compare

def test_compare_hides_exactly_the_settings_that_do_not_compute():
    base = TrainConfig().to_dict()
    other = {f.name: another_value(f) for f in field_specs()}
    runs = [{"config": base}, {"config": other}]
    assert set(differing_settings(runs)) == set(settings_that(computes=True)) - SHOWN
    for name in settings_that(computes=False):       # one at a time, too
        assert differing_settings([{"config": base}, {"config": {**base, name: other[name]}}]) == []


# ---------------------------------------------------------------------------------------------
# --resume

@pytest.mark.parametrize("name", NAMES)
def test_resume_takes_a_changed_free_setting_and_refuses_a_fixed_one(tmp_path, name):
    # precision bf16: a run recorded with "auto" predates auto's measurement and is read as fp32
    run = make_run_folder(tmp_path / "run", data_dir=str(tmp_path / "data"), precision="bf16")
    saved = load_resume_config(run, {})
    value = another_value(next(f for f in field_specs() if f.name == name))
    if fact(name, "on_resume") == "fixed":
        with pytest.raises(TrainkitError, match=re.escape(f"{flag_name(name)} ") + ".* contradicts the run"):
            load_resume_config(run, {name: value})
    else:
        expected = str(Path(value).resolve()) if name == "data_dir" else value
        assert load_resume_config(run, {name: value}) == saved.replace(**{name: expected})  # and nothing else
    assert load_resume_config(run, {name: getattr(saved, name)}) == saved     # the saved value: always taken


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_extending_a_run_is_refused_exactly_for_fixed_length_schedules(tmp_path, scheduler):
    run = make_run_folder(tmp_path / "run", scheduler=scheduler, epochs=3)
    if SCHEDULERS.fact(scheduler, "fixed_length"):
        with pytest.raises(TrainkitError, match=f"--epochs cannot change when resuming a run with --scheduler "
                                                f"{scheduler}: its schedule was planned for 3 epochs"):
            load_resume_config(run, {"epochs": 5})
    else:
        assert load_resume_config(run, {"epochs": 5}).epochs == 5
    assert load_resume_config(run, {"epochs": 3}).epochs == 3       # the same count is no change
    with pytest.raises(TrainkitError, match="fewer than the 1 epochs"):
        load_resume_config(run, {"epochs": 0})


def test_onecycle_and_cosine_are_the_schedules_of_fixed_length():
    assert {s for s in SCHEDULERS if SCHEDULERS.fact(s, "fixed_length")} == {"onecycle", "cosine"}


@pytest.mark.slow
def test_a_real_run_resumes_with_changed_free_settings_and_refuses_a_fixed_one(tmp_path):
    tiny = ["--model", "speednet", "--limit-train", "256", "--limit-test", "128", "--batch-size", "64",
            "--scheduler", "step", "--no-progress"]
    whole, run = tmp_path / "whole", tmp_path / "run"
    cli_ok("train", *tiny, "--epochs", "2", "--out", whole)
    cli_ok("train", *tiny, "--epochs", "1", "--out", run)
    before = (run / "last.pt").read_bytes()
    assert_one_line_error(run_cli("train", "--resume", run, "--seed", "5"), "--seed 5 contradicts the run")
    assert (run / "last.pt").read_bytes() == before
    cli_ok("train", "--resume", run, "--epochs", "2", "--workers", "0", "--device", "cpu", "--tensorboard",
           "--progress")
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["epochs"], saved["workers"], saved["device"], saved["tensorboard"], saved["progress"]) == \
        (2, 0, "cpu", True, True)
    assert list((run / "tensorboard").iterdir())
    rows = lambda path: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(path / "metrics.csv"))]
    assert len(rows(run)) == 2 and rows(run) == rows(whole)
    a, b = torch.load(run / "model.pt", weights_only=True), torch.load(whole / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)        # extended: the 2-epoch run, bit for bit


# ---------------------------------------------------------------------------------------------
# Commands offer the flags of what they run

def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def offered(command: str) -> set[str]:
    return {a.dest for a in _subparser(command)._actions if a.dest in NAMES and a.help != argparse.SUPPRESS}


def test_lr_find_offers_the_settings_of_training_steps_and_refuses_the_others(capsys):
    runs = ("data", "model", "step", "console")
    assert offered("lr-find") == set(settings_that(part=runs)) - {"lr"}
    assert {"epochs", "scheduler", "ema", "tensorboard", "mlflow"}.isdisjoint(offered("lr-find"))
    assert "clip_grad_norm" in offered("lr-find")          # clipping acts in the step: the sweep honours it
    for name in set(NAMES) - offered("lr-find"):
        f = next(f for f in field_specs() if f.name == name)
        value = [] if config.kind_of(f) == "bool" else [str(another_value(f))]
        assert main(["lr-find", flag_name(name), *value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"trainkit: error: lr-find does not take {flag_name(name)}: "), err
        assert ("the sweep sets it" in err[0]) == (name == "lr"), err


def test_tune_offers_every_setting_but_those_each_trial_sets(capsys, tmp_path):
    assert offered("tune") == set(NAMES) - set(TRIAL_SETTINGS)
    assert offered("train") == set(NAMES)
    assert main(["tune", "space.yaml", "--mlflow-register", "digits"]) == 2
    assert "tune does not take --mlflow-register: every trial runs with it off" in capsys.readouterr().err
    (tmp_path / "space.yaml").write_text("lr: [0.1, 0.2]\nprogress: [true, false]\n")
    with pytest.raises(TrainkitError, match="progress cannot be searched: every trial runs with it off"):
        load_space(tmp_path / "space.yaml", TrainConfig())


def test_the_resume_help_names_what_a_resume_may_change():
    text = next(a.help for a in _subparser("train")._actions if a.dest == "resume")
    named = set(re.findall(r"--[a-z-]+", text))
    assert named == {flag_name(n) for n in may_change_on_resume()}
    assert re.search(r"extend --epochs\b", text)


# ---------------------------------------------------------------------------------------------
# A new setting is its field only

def test_a_new_setting_needs_only_its_field(monkeypatch, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Wider(TrainConfig):
        colour: str = _opt("red", "a colour that computes nothing", part="loop", computes=False, on_resume="free")
        shade: int = _opt(1, "a shade that does", part="data", positive=True)

    monkeypatch.setattr(config, "TrainConfig", Wider)
    assert "colour" in settings_that(computes=False) and "colour" in may_change_on_resume()
    assert "| colour | `--colour` | red | no | free | loop |" in config.settings_markdown()
    # compare: hidden, and the other shown
    base = Wider().to_dict()
    assert differing_settings([{"config": base}, {"config": {**base, "colour": "blue", "shade": 2}}]) == ["shade"]
    # flags: train's, and a command that runs no loop refuses it in one line
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert parser.parse_args(["--colour", "blue", "--shade", "3"]).shade == 3
    steps_only = argparse.ArgumentParser(prog="trainkit sweep")
    add_command_flags(steps_only, runs=("data", "step"))
    assert steps_only.parse_args(["--shade", "2"]).shade == 2
    with pytest.raises(TrainkitError, match="sweep does not take --colour: it is a setting of the run's loop"):
        steps_only.parse_args(["--colour", "blue"])
    # checks and config files
    with pytest.raises(TrainkitError, match="--shade must be greater than 0"):
        config.validate(Wider(shade=0))
    assert config.from_mapping({"colour": "green"}).colour == "green"
    # --resume: the free one taken, the fixed one refused
    run = tmp_path / "run"
    make_run_folder(run)
    assert load_resume_config(run, {"colour": "blue"}).colour == "blue"
    with pytest.raises(TrainkitError, match="--shade 2 contradicts the run being resumed"):
        load_resume_config(run, {"shade": 2})


# ---------------------------------------------------------------------------------------------
# Registry entries carry facts

def test_a_registry_entry_carries_its_facts():
    things = Registry("thing", facts={"fast": False, "size": 1})

    @things.register("hare", fast=True)
    def hare():
        pass

    @things.register()
    def tortoise():
        pass

    assert things.facts("hare") == {"fast": True, "size": 1} and things.fact("tortoise", "fast") is False
    with pytest.raises(ValueError, match="thing entries carry no fact colour"):
        things.register("owl", colour="brown")
    with pytest.raises(TrainkitError, match="unknown thing 'owl'; choose one of hare, tortoise"):
        things.facts("owl")
    facts = things.facts("hare")
    facts["fast"] = False          # a copy: the entry's facts stay
    assert things.fact("hare", "fast") is True
