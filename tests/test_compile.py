"""--compile auto|on|off: the payback arithmetic, the measured choice and its cache, the old
true/false settings, the line a run prints, and a compiled run that resumes bit for bit."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_one_line_error, run_cli
from trainkit import TrainConfig, train
from trainkit.commands.flags import Parser, add_config_flags, config_from_args
from trainkit.config import from_mapping, load_config_file
from trainkit.errors import TrainkitError
from trainkit.loop import devices
from trainkit.loop.devices import Choice, choose, decide_compile, payback
from trainkit.loop.engine import Callback, StopRequested
from trainkit.loop.optim import build_optimizer
from trainkit.run.reports import tuning_line


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd(params, fused=False):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, **({"foreach": True} if fused else {}))


# -- the payback: (uncompiled - compiled step) x planned steps against the compile time ---------------

def test_compiling_pays_back_only_within_the_planned_steps():
    short = payback(0.30, 0.20, 20.0, steps=100)           # saves 10 s, costs 20 s
    assert short["pays"] is False and short["saved_seconds"] == pytest.approx(10.0)
    long = payback(0.30, 0.20, 20.0, steps=300)             # saves 30 s
    assert long["pays"] is True and long["compile_seconds"] == 20.0 and long["saved_per_step"] == pytest.approx(0.1)
    assert payback(0.30, 0.20, 20.0, steps=300, shapes=2)["pays"] is False    # a shorter last batch: two compiles
    assert payback(0.20, 0.25, 1.0, steps=10**6)["pays"] is False            # slower compiled: never


def measured(eager=0.30, compiled=None):
    timings = {"fp32, channels_last on": {"seconds": eager, "spread": 0.02, "finite": True}}
    if compiled is not None:
        timings["fp32, channels_last on, compiled"] = compiled
    return {"choice": {"precision": "fp32", "channels_last": "on"}, "timings": timings}


def compiled_timing(seconds=0.20, eager=0.30, compile_seconds=20.0, spread=0.02, noisy=False):
    """A compiled step's timing as measure_compiled records it: its median and the uncompiled
    step's, from the same interleaved rounds."""
    return {"seconds": seconds, "spread": spread, "finite": True, "compile_seconds": compile_seconds,
            "rounds": [[seconds] * 3], "warmup": [compile_seconds + seconds],
            "eager": {"seconds": eager, "spread": spread, "rounds": [[eager] * 3]}, "noisy": noisy}


def test_auto_resolves_by_the_payback_and_on_off_as_asked():
    timed = compiled_timing()
    on = decide_compile(measured(compiled=timed), "auto", steps=300)
    assert on["choice"] == {"precision": "fp32", "channels_last": "on", "compile": "on"}
    assert on["compile"]["chosen"] == "on" and on["compile"]["payback"]["saved_seconds"] == pytest.approx(30.0)
    off = decide_compile(measured(compiled=timed), "auto", steps=100)
    assert off["choice"]["compile"] == "off" and off["compile"]["payback"]["pays"] is False
    failed = {"seconds": None, "finite": False, "error": "InductorError: no C++ compiler"}
    left_out = decide_compile(measured(compiled=failed), "auto", steps=10**6)
    assert left_out["choice"]["compile"] == "off" and "no C++ compiler" in left_out["compile"]["why"]
    untimed = decide_compile(measured(), "auto", steps=5)
    assert untimed["choice"]["compile"] == "off" and "not timed" in untimed["compile"]["why"]
    for asked in ("on", "off"):
        assert decide_compile(measured(), asked, steps=5)["choice"]["compile"] == asked


def test_the_payback_compares_warm_steps_of_the_same_rounds():
    """The issue's case: a cold uncompiled step (2.04 s) against a warm compiled one made compiling
    "save 976 s over 540 steps". Warm steps from the same rounds decide, and over the real steps."""
    timings = measured(eager=2.04, compiled=compiled_timing(seconds=0.110, eager=0.106, compile_seconds=132.0))
    slower = decide_compile(timings, "auto", steps=540)
    assert slower["choice"]["compile"] == "off" and "payback" not in slower["compile"]
    assert slower["compile"]["why"] == "compiled 0.110 s/step against 0.106: not faster by more than 5%"
    within = compiled_timing(seconds=0.090, eager=0.100, compile_seconds=1.0, spread=0.15)   # 10% < its 15% spread
    assert decide_compile(measured(compiled=within), "auto", steps=10**6)["choice"]["compile"] == "off"
    noisy = compiled_timing(seconds=0.080, eager=0.100, compile_seconds=1.0, noisy=True)    # 20% < the noisy margin
    assert decide_compile(measured(compiled=noisy), "auto", steps=10**6)["choice"]["compile"] == "off"
    quick = compiled_timing(seconds=0.05, eager=0.106, compile_seconds=10.0)
    faster = decide_compile(measured(eager=2.04, compiled=quick), "auto", steps=540)
    assert faster["compile"]["payback"]["saved_seconds"] == pytest.approx((0.106 - 0.05) * 540)   # not 2.04 s a step
    assert faster["compile"]["payback"]["pays"] is True


def test_compile_is_timed_once_when_it_could_pay_and_cached_with_the_other_choices(monkeypatch, own_cache):
    timed = []
    monkeypatch.setattr(devices, "measure", lambda *a, **k: {**measured(), "tries": [], "noisy": False})
    monkeypatch.setattr(devices, "measure_compiled", lambda *a, **k: timed.append(a[5]) or compiled_timing())
    ask = lambda steps, compile="auto": choose(small_net(), sgd, F.cross_entropy, *batch(), precision="fp32",
                                               channels_last="auto", name="small", compile=compile, steps=steps)
    short = ask(10)                  # 10 x 0.3 s: no compile could pay back, so none is timed
    assert timed == [] and short["choice"]["compile"] == "off" and "not timed" in short["compile"]["why"]
    long = ask(1000)                 # saves 100 s against 20 s
    assert timed == [Choice("fp32", "on")] and long["choice"]["compile"] == "on" and long["cached"] is False
    assert long["timings"]["fp32, channels_last on, compiled"]["compile_seconds"] == 20.0
    again = ask(150)                 # cached: not timed again, decided anew for this run's steps (15 s < 20 s)
    assert len(timed) == 1 and again["cached"] is True and again["choice"]["compile"] == "off"
    assert again["compile"]["payback"]["steps"] == 150
    entries = json.loads((own_cache / "choices.json").read_text())
    assert sorted(json.loads(k)["compile"] for k in entries) == ["auto"]    # the key says what was asked
    forced = ask(1000, compile="on")                          # asked for: not timed, another cache entry
    assert forced["choice"]["compile"] == "on" and len(timed) == 1 and "compile" not in forced
    assert sorted(json.loads(k)["compile"] for k in json.loads((own_cache / "choices.json").read_text())) == \
        ["auto", "on"]


def test_a_noisy_compile_timing_is_not_cached(monkeypatch, own_cache):
    monkeypatch.setattr(devices, "measure", lambda *a, **k: {**measured(), "tries": [], "noisy": False})
    monkeypatch.setattr(devices, "measure_compiled", lambda *a, **k: compiled_timing(seconds=0.1, noisy=True))
    ask = lambda: choose(small_net(), sgd, F.cross_entropy, *batch(), precision="fp32", channels_last="auto",
                         name="small", compile="auto", steps=1000)
    first = ask()
    assert first["choice"]["compile"] == "on" and not (own_cache / "choices.json").exists()   # 3x faster: clear
    assert ask()["cached"] is False
    assert "; compiled 0.100 s/step (noisy, so not cached), saves " in tuning_line(first)
    # Uncompiled steps timed on busy cores: no compile is timed (minutes there), nothing is cached.
    monkeypatch.setattr(devices, "measure", lambda *a, **k: {**measured(), "tries": [], "noisy": True})
    busy = ask()
    assert busy["choice"]["compile"] == "off"
    assert busy["compile"]["why"] == "not timed: the uncompiled steps' timing was noisy"
    assert not (own_cache / "choices.json").exists()


def test_a_compile_that_fails_is_recorded_with_its_error_and_left_out(monkeypatch):
    def no_compiler(model):
        raise RuntimeError("InductorError: CppCompileError: C++ compile error\ncommand: g++ ...")
    monkeypatch.setattr(devices, "compiled", no_compiler)
    rng = torch.get_rng_state()
    found = devices.measure_compiled(small_net(), sgd, F.cross_entropy, *batch(), Choice("fp32", "on"))
    assert found == {"seconds": None, "finite": False,
                     "error": "RuntimeError: InductorError: CppCompileError: C++ compile error"}
    assert torch.equal(torch.get_rng_state(), rng)
    decided = decide_compile(measured(compiled=found), "auto", steps=10**6)
    assert decided["choice"]["compile"] == "off" and "CppCompileError" in decided["compile"]["why"]


# torch looks for its C++ compiler and the processor's vector instructions once a process and keeps what
# it found in many caches (torch._inductor.cpp_builder, cpu_vec_isa): a test that hides the compiler in
# this process would leave later compiles in it without vector code or failing. So it runs in its own.
NO_CXX_CHECK = """
import os, torch, torch.nn as nn, torch.nn.functional as F
from trainkit import TrainConfig
from trainkit.data.registry import load_dataset
from trainkit.errors import TrainkitError
from trainkit.loop import devices
from trainkit.run.experiment import build_experiment
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
sgd = lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)
found = devices.measure_compiled(net, sgd, F.cross_entropy, x, y, devices.Choice("fp32", "on"))
print("measure_compiled:", found["seconds"], found["error"])
try:
    build_experiment(TrainConfig(compile="on", progress=False, device="cpu"), data=load_dataset("mnist", os.environ["TRAINKIT_DATA_DIR"], progress=False, limit_train=64, limit_test=64))
except TrainkitError as exc:
    print("build_experiment:", exc)
"""


@pytest.mark.slow
def test_without_a_cpp_compiler_compile_is_left_out_or_one_line():
    proc = subprocess.run([sys.executable, "-c", NO_CXX_CHECK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CXX": "/nonexistent/g++"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    timed, built = proc.stdout.splitlines()[-2:]
    assert timed.startswith("measure_compiled: None") and "no C++ compiler" in timed
    assert re.search("build_experiment: --compile on: torch.compile found no C\\+\\+ compiler.*--compile off", built), built


@pytest.mark.slow
def test_compile_on_without_a_cpp_compiler_is_one_line_from_the_cli(tmp_path):
    proc = run_cli("train", "--compile", "--limit-train", "64", "--limit-test", "64", "--epochs", "1",
                   "--device", "cpu", "--out", tmp_path / "run", env={"CXX": "/nonexistent/g++"})
    assert_one_line_error(proc, "--compile on: torch.compile found no C++ compiler", "--compile off")
    assert not (tmp_path / "run").exists()


def test_the_compiled_steps_optimizer_is_fused_where_torch_has_one():
    params = list(small_net().parameters())
    for name in ("sgd", "adamw", "adam"):
        cfg = TrainConfig(optimizer=name, weight_decay=0.01, nesterov=name == "sgd")
        plain = build_optimizer(params, cfg)
        fused = build_optimizer(params, cfg.replace(compile="on"))
        assert type(fused) is type(plain) and not plain.defaults.get("fused")
        assert fused.param_groups[0]["fused"] or fused.param_groups[0]["foreach"], name
        assert fused.param_groups[0]["weight_decay"] == plain.param_groups[0]["weight_decay"] == 0.01


# -- the setting: auto|on|off, and the true/false of runs made before -----------------------------------

def test_old_boolean_compile_settings_still_load(tmp_path):
    assert from_mapping({"compile": True}).compile == "on"
    assert from_mapping({"compile": False}).compile == "off"
    assert TrainConfig().compile == "auto"
    old_run = tmp_path / "config.json"
    old_run.write_text(json.dumps({"config": {**TrainConfig().to_dict(), "compile": False}, "environment": {}}))
    assert from_mapping(load_config_file(old_run)).compile == "off"


def test_the_compile_flag():
    parser = Parser(prog="trainkit train")
    add_config_flags(parser)
    parse = lambda *argv: config_from_args(parser.parse_args(list(argv)))[0].compile
    assert parse() == "auto" and parse("--compile") == "on" and parse("--compile", "off") == "off"
    with pytest.raises(TrainkitError, match="invalid choice: 'maybe'"):
        parse("--compile", "maybe")


def test_the_line_a_run_prints_about_its_measured_choices():
    quiet = {"tries": [{"rounds": 5, "spread": 0.03, "waited": 0.01, "noisy": False}], "noisy": False,
             "spread": 0.03, "waited": 0.01}
    line = tuning_line({**decide_compile(measured(compiled=compiled_timing()), "auto", steps=300), "cached": True,
                        **quiet})
    assert line == ("Measured (cached): fp32, channels_last on at 0.300 s/step (spread 3%); compiled 0.200 s/step, "
                    "saves 30 s over 300 steps against 20 s to compile: compile on")
    line = tuning_line({**decide_compile(measured(), "auto", steps=5), "cached": False, **quiet})
    assert line == ("Measured: fp32, channels_last on at 0.300 s/step (spread 3%); compile off (not timed: 5 steps "
                    "cannot pay back a compile)")
    noisy = {"tries": [{"rounds": 3, "spread": 0.40, "waited": 0.86, "noisy": True},
                       {"rounds": 3, "spread": 0.25, "waited": 0.7, "noisy": True}],
             "noisy": True, "spread": 0.31, "waited": 0.7}
    line = tuning_line({**decide_compile(measured(compiled=compiled_timing(seconds=0.35)), "auto", steps=10**6),
                        "cached": False, **noisy})
    assert line == ("Measured (noisy, so not cached): fp32, channels_last on at 0.300 s/step (spread 31% over 2 "
                    "tries, our threads waited for a core 70% of the time); compile off (compiled 0.350 s/step "
                    "against 0.300: not faster by more than 5%)")            # a slower compile: no negative saving
    assert tuning_line({"choice": {"precision": "fp32", "channels_last": "on", "compile": "off"}, "timings": {}}) is None


def test_a_short_run_with_compile_auto_trains_as_compile_off(mnist):
    """The seed recipe's numbers: auto on a run too short to pay back a compile is the uncompiled run, bit for bit."""
    data = mnist.limit(256, 64)
    cfg = TrainConfig(epochs=1, batch_size=64, progress=False, precision="fp32", channels_last="on")
    auto = train(cfg, data=data, write=False)
    off = train(cfg.replace(compile="off"), data=data, write=False)
    assert auto.run.cfg.compile == "off" and auto.run.train_model is auto.run.model
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h.rows()]
    assert strip(auto.history) == strip(off.history)


# -- a compiled run resumes bit for bit with itself ----------------------------------------------------

class InterruptAt(Callback):
    def on_batch_end(self, state):
        if state.epoch == 1 and state.batch == 1:
            state.interrupt()


@pytest.mark.slow
def test_a_compiled_run_resumes_bit_for_bit(mnist, tmp_path):
    data = mnist.limit(256, 64)           # 4 steps of 64: one batch shape, so one compile
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False, compile="on", precision="fp32",
                      channels_last="on", device="cpu")
    whole = train(cfg, data=data, out=tmp_path / "whole")
    assert isinstance(whole.run.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert whole.run.optimizer.param_groups[0]["fused"] or whole.run.optimizer.param_groups[0]["foreach"]
    with pytest.raises(StopRequested) as stopped:
        train(cfg, data=data, out=tmp_path / "cut", callbacks=[InterruptAt()])
    assert stopped.value.partial["batches"] == 2
    resumed = train(cfg, data=data, resume=tmp_path / "cut")
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h.rows()]
    assert strip(resumed.history) == strip(whole.history) and len(whole.history) == 2
    for name in ("model.pt", "last.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / name, weights_only=True)
        a, b = (a["model"], b["model"]) if name == "last.pt" else (a, b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)    # bit for bit
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved["config"]["compile"] == "on"


def test_bench_compiles_the_fast_path_only():
    from trainkit.commands.bench import full_sides, sides
    from trainkit.commands.cli import build_parser
    cfg, _ = config_from_args(build_parser().parse_args(["bench", "--quick", "--compile", "on"]))
    assert cfg.compile == "on"
    assert {k: v.compile for k, v in sides("cpu", cfg.compile).items()} == {"seed pipeline": "off",
                                                                            "trainkit fast path": "on"}
    assert [v.compile for v in full_sides("cpu").values()] == ["off", "auto", "auto"]
