"""--precision auto and --channels-last auto: the candidates (bf16 only where it is native), the
measurement (fastest finite, the run's weights and RNGs untouched), its cache, config.json."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainkit import TrainConfig, train
from trainkit.config import from_mapping
from trainkit.loop import devices
from trainkit.loop.devices import Choice, candidates, choose, measure

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("flags, capability, native", [
    ({"avx2", "avx512f"}, "AVX512", False),           # AVX-512 without BF16 (Zen 3, older Xeons): emulated
    ({"avx2"}, "AVX2", False),
    ({"avx512f", "avx512_bf16"}, "AVX512", True),     # Zen 4, Cooper Lake / Sapphire Rapids
    ({"amx_bf16", "amx_tile"}, "AMX", True),
])
def test_bf16_is_a_candidate_only_where_it_is_native(monkeypatch, flags, capability, native):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    monkeypatch.setattr(devices, "bf16_supported", lambda device: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert devices.bf16_native(CPU) is native
    precisions = {c.precision for c in candidates("auto", "auto", CPU)}
    assert precisions == ({"fp32", "bf16"} if native else {"fp32"})
    assert candidates("auto", "auto", CPU)[0] == Choice("fp32", "on")
    assert candidates("bf16", "off", CPU) == [Choice("bf16", "off")]      # asked for: no choice to make


def test_the_fastest_finite_candidate_is_chosen(monkeypatch):
    fake = {Choice("fp32", "on"): ([0.5, 0.4], True), Choice("fp32", "off"): ([0.3], True),
            Choice("bf16", "on"): ([0.1], False), Choice("bf16", "off"): ([0.6], True)}
    monkeypatch.setattr(devices, "time_choice", lambda *a, **k: fake[a[5]])
    found = measure(small_net(), sgd, F.cross_entropy, *batch(), list(fake))
    assert found["choice"] == {"precision": "fp32", "channels_last": "off"}   # bf16 on was faster, but NaN
    assert found["timings"]["fp32, channels_last on"]["seconds"] == 0.4
    assert found["timings"]["bf16, channels_last on"]["finite"] is False
    nothing_finite = {c: (t, False) for c, (t, _) in fake.items()}
    monkeypatch.setattr(devices, "time_choice", lambda *a, **k: nothing_finite[a[5]])
    assert measure(small_net(), sgd, F.cross_entropy, *batch(), list(fake))["choice"] == \
        {"precision": "fp32", "channels_last": "on"}


def test_a_candidate_that_fails_is_left_out(monkeypatch):
    def fails_in_bf16(*args, **kwargs):
        if args[5].precision == "bf16":
            raise RuntimeError("no bf16 kernel for this operation\nmore")
        return [0.2], True
    monkeypatch.setattr(devices, "time_choice", fails_in_bf16)
    found = measure(small_net(), sgd, F.cross_entropy, *batch(), [Choice("bf16", "on"), Choice("fp32", "on")])
    assert found["choice"] == {"precision": "fp32", "channels_last": "on"}
    assert found["timings"]["bf16, channels_last on"] == {"seconds": None, "finite": False,
                                                         "error": "no bf16 kernel for this operation"}


def test_measuring_leaves_the_model_and_random_state_alone():
    model, (x, y) = small_net(), batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    found = measure(model, sgd, F.cross_entropy, x, y, candidates("fp32", "auto", CPU), seconds=0.5)
    assert set(found["timings"]) == {"fp32, channels_last on", "fp32, channels_last off"}
    assert all(t["finite"] and 1 <= len(t["steps"]) <= 3 and t["seconds"] > 0 for t in found["timings"].values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)                       # dropout drew during the steps
    assert next(model.parameters()).is_contiguous()                      # the copy was converted, not the model


def test_the_cache_keeps_a_choice_and_a_damaged_cache_is_measured_again(monkeypatch, own_cache):
    calls = []
    real = devices.measure
    monkeypatch.setattr(devices, "measure", lambda *a, **k: calls.append(1) or real(*a, **k, seconds=0.2))
    ask = lambda n=16: choose(small_net(), sgd, F.cross_entropy, *batch(n), precision="fp32", channels_last="auto",
                              name="small")
    first = ask()
    assert first["cached"] is False and len(calls) == 1 and len(first["timings"]) == 2
    again = ask()
    assert again["cached"] is True and len(calls) == 1 and again["choice"] == first["choice"]
    assert again["timings"] == json.loads(json.dumps(first["timings"]))
    ask(32)                                                              # another batch: measured
    assert len(calls) == 2
    for damage in ["{not json", "[1, 2]", json.dumps({k: {"choice": {"precision": "fp8"}} for k in
                                                     json.loads((own_cache / "choices.json").read_text())})]:
        (own_cache / "choices.json").write_text(damage)
        assert ask()["cached"] is False                                  # measured again, no error
    assert ask()["cached"] is True                                       # and written back whole
    explicit = choose(small_net(), sgd, F.cross_entropy, *batch(), precision="fp32", channels_last="on", name="small")
    assert explicit == {"choice": {"precision": "fp32", "channels_last": "on", "compile": "off"}, "timings": {},
                        "cached": False}


def test_an_unwritable_cache_is_no_error(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TRAINKIT_CACHE_DIR", str(tmp_path / "file" / "cache"))      # under a file: cannot exist
    found = choose(small_net(), sgd, F.cross_entropy, *batch(), precision="fp32", channels_last="auto", name="s")
    assert found["cached"] is False and found["choice"]["precision"] == "fp32"


def test_config_files_from_before_auto_still_load():
    assert from_mapping({"channels_last": True}).channels_last == "on"
    assert from_mapping({"channels_last": False}).channels_last == "off"
    assert from_mapping({"channels_last": "auto"}).channels_last == "auto"


@pytest.mark.slow
def test_a_measured_run_trains_exactly_as_one_given_its_choice(mnist, tmp_path):
    data = mnist.limit(256, 100)
    cfg = TrainConfig(model="compact", epochs=1, batch_size=64, progress=False)
    measured = train(cfg, data=data, out=tmp_path / "auto")
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    tuning = saved["tuning"]
    assert tuning["cached"] is False and len(tuning["timings"]) in (2, 4)
    assert {saved["config"]["precision"], saved["config"]["channels_last"]} <= {"fp32", "bf16", "on", "off"}
    assert saved["config"]["precision"] == tuning["choice"]["precision"]
    assert saved["environment"]["autocast"] == {"fp32": "fp32", "bf16": "bfloat16"}[tuning["choice"]["precision"]]
    given = train(cfg.replace(**tuning["choice"]), data=data, write=False)
    assert given.run.tuning["timings"] == {}                      # explicit: nothing measured
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h.rows()]
    assert strip(measured.history) == strip(given.history)
    for (name, a), b in zip(measured.run.model.state_dict().items(), given.run.model.state_dict().values()):
        assert torch.equal(a, b), name
    cached = train(cfg, data=data, write=False)
    assert cached.run.tuning["cached"] is True and strip(cached.history) == strip(measured.history)


@pytest.mark.parametrize("autocast, precision", [("fp32", "fp32"), ("bfloat16", "bf16")])
def test_a_run_from_before_auto_resumes_in_what_it_trained_in(tmp_path, autocast, precision):
    from trainkit.run.resume import load_resume_config
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"config": {"precision": "auto", "channels_last": True},
                                                      "environment": {"autocast": autocast}}))
    cfg = load_resume_config(tmp_path, {})
    assert (cfg.precision, cfg.channels_last) == (precision, "on")     # nothing measured again on resume


# ---------------------------------------------------------------------------------------------
# Measurements that cannot exhaust memory or take minutes (Reliability III)

def test_activation_bytes_grow_with_the_batch_and_leave_the_model_alone():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(8 * 26 * 26, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    two, eight = (devices.activation_bytes(model, F.cross_entropy, *batch(n)) for n in (2, 8))
    assert 3.5 < eight / two < 4.5                          # per image, the weights are not counted
    assert 2 * 8 * 26 * 26 * 4 <= two < 2 * 1 << 20         # at least the conv's output, far below a MiB
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # batch norm's statistics too
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_batch_that_cannot_fit_in_memory_is_refused_in_one_line():
    """Nothing of the batch's size is allocated: the estimate comes from two images."""
    model, (x, y) = small_net(), batch(2)
    free = devices.available_memory(CPU)
    per_image = devices.activation_bytes(model, F.cross_entropy, x, y) / 2
    assert devices.check_memory(model, F.cross_entropy, x, y, 64, "--batch-size 64") < free
    huge = int(2 * free / per_image)
    with pytest.raises(devices.TrainkitError, match=r"--batch-size \d+: one training step needs about .* GiB "
                                                    r".* more than the .* GiB free on cpu; use a smaller --batch-size"):
        devices.check_memory(model, F.cross_entropy, x, y, huge, f"--batch-size {huge}")


def test_the_measurement_has_a_time_cap():
    """With no time at all, the first candidate's one step stands as its timing; the rest are not timed."""
    options = candidates("fp32", "auto", CPU)
    found = measure(small_net(), sgd, F.cross_entropy, *batch(), options, seconds=0.0, cap=0.0)
    first, second = (found["timings"][o.label] for o in options)
    assert len(first["steps"]) == 1 and first["finite"]
    assert second["seconds"] is None and "passed its cap" in second["error"]
    assert found["choice"] == {"precision": "fp32", "channels_last": "on"}


@pytest.mark.slow
def test_a_batch_larger_than_the_data_times_only_the_data(tmp_path, own_cache):
    """--batch-size 100000 of 2,048 images timed a batch of 100,000 (19.5 GB before it was killed)."""
    import resource
    import subprocess
    import sys

    from conftest import data_dir

    proc = subprocess.run([sys.executable, "-m", "trainkit", "train", "--batch-size", "100000", "--limit-train", "2048",
                           "--limit-test", "128", "--epochs", "1", "--no-progress", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TRAINKIT_DATA_DIR": str(data_dir()),
                               "TRAINKIT_CACHE_DIR": str(own_cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    assert peak_gib < 4, peak_gib
    timed = json.loads((own_cache / "choices.json").read_text())
    assert all(json.loads(key)["input"][0] == 2048 for key in timed)


@pytest.mark.slow
def test_cheap_refusals_come_before_the_measurement(tmp_path, own_cache):
    """onecycle with too few steps was refused after 198 s of timing batches of 4,096."""
    from conftest import assert_one_line_error, run_cli

    proc = run_cli("train", "--batch-size", "4096", "--scheduler", "onecycle", "--limit-train", "2048", "--epochs", "2",
                   "--out", tmp_path / "run", env={"TRAINKIT_CACHE_DIR": str(own_cache)}, timeout=300)
    assert_one_line_error(proc, "--scheduler onecycle needs at least 3 training steps, this run has 2")
    assert not (own_cache / "choices.json").exists()             # nothing was timed
