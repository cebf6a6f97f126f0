"""--precision auto and --channels-last auto: the candidates (bf16 only where it is native), the
measurement (fastest finite, the run's weights and RNGs untouched), its cache, config.json."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainkit import TrainConfig, train
from trainkit import devices
from trainkit.config import from_mapping
from trainkit.devices import Choice, candidates, choose, measure

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
    assert explicit == {"choice": {"precision": "fp32", "channels_last": "on"}, "timings": {}, "cached": False}


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
    assert given.experiment.tuning["timings"] == {}                      # explicit: nothing measured
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h.rows()]
    assert strip(measured.history) == strip(given.history)
    for (name, a), b in zip(measured.experiment.model.state_dict().items(), given.experiment.model.state_dict().values()):
        assert torch.equal(a, b), name
    cached = train(cfg, data=data, write=False)
    assert cached.experiment.tuning["cached"] is True and strip(cached.history) == strip(measured.history)


@pytest.mark.parametrize("autocast, precision", [("fp32", "fp32"), ("bfloat16", "bf16")])
def test_a_run_from_before_auto_resumes_in_what_it_trained_in(tmp_path, autocast, precision):
    from trainkit.rundir import load_resume_config
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"config": {"precision": "auto", "channels_last": True},
                                                      "environment": {"autocast": autocast}}))
    cfg = load_resume_config(tmp_path, {})
    assert (cfg.precision, cfg.channels_last) == (precision, "on")     # nothing measured again on resume
