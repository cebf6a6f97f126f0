"""`trainkit bench`: both modes on small real subsets (the full benchmark is a run, not a test)."""
import json
import re

import pytest

from trainkit import TrainConfig
from trainkit.commands.bench import full

from conftest import cli_ok

pytestmark = pytest.mark.slow   # training runs, and a benchmark subprocess


def test_quick_mode_prints_both_rates_and_their_ratio():
    lines = cli_ok("bench", "--quick", "--steps", "2", "--device", "cpu").stdout.strip().splitlines()
    rates = {m[1]: float(m[2]) for line in lines if (m := re.match(r"(.+): (\d+) images/s", line))}
    assert set(rates) == {"seed pipeline", "trainkit fast path"}
    last = re.fullmatch(r"speedup: (\d+\.\d\d)", lines[-1])
    assert last, lines[-1]
    # The roofline: the step's achieved rate and its share of the measured matmul peak.
    # The peak is that of the precision the fast path ran in (--precision auto: measured, bf16 where native).
    step = re.fullmatch(r"step: (\d+) GFLOP/s, (\d+)% of this machine's peak \((fp32|bf16), as the step ran\)",
                        lines[-2])
    peaks = dict(re.findall(r"(fp32|bf16) (\d+) GFLOP/s", lines[-3]))
    assert step and lines[-3].startswith("peak: fp32 "), lines[-3:]
    peak = int(peaks[step[3]])
    assert peak > 0 and 0 < int(step[2]) <= 150
    # both rates are printed as whole GFLOP/s: each rounding moves the share by up to 50/peak points
    assert abs(int(step[1]) / peak * 100 - int(step[2])) <= 1 + 100 / peak
    fast = next(line for line in lines if line.startswith("trainkit fast path:"))
    assert re.search(rf"{step[3]} precision, channels_last (on|off), compile (on|off) \(auto: auto, auto, auto\)",
                     fast), fast
    seed = next(line for line in lines if line.startswith("seed pipeline:"))
    assert "fp32 precision, channels_last off, compile off)" in seed, seed
    ratio = rates["trainkit fast path"] / rates["seed pipeline"]
    assert abs(float(last[1]) - ratio) < 0.01 * ratio + 0.01
    # Each side's spread over groups of its timed steps, and whether the machine was quiet.
    spreads = [int(m[1]) for line in lines
               if (m := re.search(r"\); spread (\d+)% over 2 groups of 1 step\(s\)$", line))]
    assert len(spreads) == 2, lines
    machine = re.fullmatch(r"machine: (quiet|busy) \(load average (\d+\.\d\d) before the bench, (\d+) cores; "
                           r"spread up to (\d+)%(; our threads waited for a core (\d+)% of the time)?\)"
                           r"(: these figures are rough; rerun on quiet cores to trust them)?", lines[-4])
    assert machine and int(machine[4]) == max(spreads), lines[-4]
    assert (machine[1] == "busy") == bool(machine[7])


def test_the_machine_is_quiet_only_when_every_sign_says_so():
    from trainkit.commands.bench import machine_line
    steady = {"seed pipeline": {"spread": 0.02, "waited": 0.01}, "fast": {"spread": 0.04, "waited": None}}
    assert machine_line(0.3, steady).startswith("machine: quiet (load average 0.30 before the bench, ")
    assert "; spread up to 4%; our threads waited for a core 1% of the time)" in machine_line(0.3, steady)
    wide = {**steady, "fast": {"spread": 0.35, "waited": 0.02}}
    waited = {**steady, "fast": {"spread": 0.02, "waited": 0.6}}
    for load, sides in [(0.3, wide), (0.3, waited), (64.0, steady)]:
        assert machine_line(load, sides).startswith("machine: busy ("), (load, sides)
        assert machine_line(load, sides).endswith("): these figures are rough; rerun on quiet cores to trust them")


def test_full_mode_times_each_side_to_the_target(mnist, tmp_path, capsys):
    data = mnist.limit(1024, 500)
    base = TrainConfig(epochs=3, batch_size=32, progress=False, device="cpu", precision="fp32", channels_last="off",
                       compile="off")     # not the auto measurement: each side's time to the target is the point
    configs = {"seed pipeline": base.replace(pipeline="torchvision", workers=0),
               "fast": base.replace(evals_per_epoch=4),
               "fast, once": base}
    report = full("cpu", data, 50.0, tmp_path, configs)
    sides = report["sides"]
    assert list(sides) == list(configs)
    for name, side in sides.items():
        assert side["reached"], (name, side)
        assert side["best_acc"] >= 50.0 and side["seconds"] <= side["total_seconds"]
        assert 0 < side["epochs_trained"] <= side["epochs_run"]
    # Four evaluations an epoch stop no later (in images trained) than one.
    assert sides["fast"]["epochs_trained"] <= sides["fast, once"]["epochs_trained"]
    assert sides["fast"]["evals_per_epoch"] == 4
    expected = sides["seed pipeline"]["seconds"] / sides["fast"]["seconds"]
    assert abs(report["speedup"] - expected) < 1e-9
    assert json.loads((tmp_path / "bench.json").read_text())["speedups"] == report["speedups"]
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in configs)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"speedup: {expected:.2f}"
    # Every evaluation is kept once, in order. A side stops at the one that reached the target;
    # the headline goes on to its last epoch, and its time is that of the first to reach it.
    once = sides["fast, once"]["evaluations"]
    assert once[-1]["test_acc"] >= 50.0 > max((e["test_acc"] for e in once[:-1]), default=0)
    assert len(once) == sides["fast, once"]["epochs_run"]
    evaluations = sides["fast"]["evaluations"]
    assert len(evaluations) == 4 * 3 and sides["fast"]["epochs_run"] == 3
    first = next(e for e in evaluations if e["test_acc"] >= 50.0)
    assert sides["fast"]["seconds"] == first["seconds"] and sides["fast"]["epochs_trained"] == first["epochs_trained"]
    assert [e["seconds"] for e in evaluations] == sorted(e["seconds"] for e in evaluations)


def test_full_mode_runs_the_headline_over_seeds(mnist, tmp_path, monkeypatch):
    from trainkit.commands import bench
    monkeypatch.setattr(bench, "SECOND_TARGET", 15.0)
    base = TrainConfig(epochs=2, batch_size=64, progress=False, device="cpu", precision="fp32", channels_last="off",
                       compile="off")
    configs = {"seed pipeline": base.replace(pipeline="torchvision", workers=0), "fast": base.replace(evals_per_epoch=2)}
    report = full("cpu", mnist.limit(1024, 200), 12.0, tmp_path, configs, seeds=2)
    sides = report["sides"]
    assert list(sides) == ["seed pipeline", "fast, seed 1", "fast, seed 2"]
    assert [s["config"]["seed"] for s in list(sides.values())[1:]] == [1, 2]
    assert sides["fast, seed 1"]["evaluations"] != sides["fast, seed 2"]["evaluations"]
    head = report["headline"]
    mean = (sides["fast, seed 1"]["seconds"] + sides["fast, seed 2"]["seconds"]) / 2
    assert head["mean_seconds"] == mean and report["speedup"] == sides["seed pipeline"]["seconds"] / mean
    assert head["min_speedup"] == min(report["speedups"].values())
    # Each seed ran its 2 epochs; the second target (monkeypatched to 15%) is counted where it was seen.
    for side in list(sides.values())[1:]:
        seen = next((e["epochs_trained"] for e in side["evaluations"] if e["test_acc"] >= 15.0), None)
        assert side["epochs_run"] == 2 and side["second_epochs_trained"] == seen
    count = sum(s["second_epochs_trained"] is not None for s in list(sides.values())[1:])
    assert head["second_reached_within_2_epochs"] == count
    assert all(side["ran_in"] == {"precision": "fp32", "channels_last": "off", "compile": "off"}
               for side in sides.values())
    assert f"15.0% within 2 epochs: {count} of 2 seed(s)." in (tmp_path / "bench.md").read_text()
