"""The one gate for code named by a file trainkit wrote (issue #22, item 1).

A run folder, a checkpoint's settings or a run's config.json are data: eval, predict, export, serve,
--resume and --config import the model code they name only when the user names it again on the
command line or passes --trust-code, and a file only while its sha256 is the recorded one. Registry
and zoo names are looked up, never imported as paths, whatever the record's "kind" says.

Every hostile run folder below names a file that writes a marker when imported; the marker must
never appear unless the user asked for that code.
"""
import hashlib
import json
import shutil
import sys

import pytest

from trainkit import TrainConfig, train
from trainkit.commands.cli import main
from trainkit.errors import TrainkitError
from trainkit.models import MODELS, gated_model_name

NET = ("import torch.nn as nn\n"
       "def tiny(num_classes=10):\n"
       "    return nn.Sequential(nn.Flatten(), nn.Linear(784, num_classes))\n")


def evil_source(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n" + NET


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, mnist_dir):
    """A finished one-epoch run of a model given as file.py:factory (its config.json records the sha256)."""
    base = tmp_path_factory.mktemp("gate")
    (base / "mynet.py").write_text(NET)
    cfg = TrainConfig(model=f"{base / 'mynet.py'}:tiny", epochs=1, batch_size=64, progress=False,
                      precision="fp32", channels_last="off", limit_train=256, limit_test=128)
    train(cfg, out=base / "run")
    saved = json.loads((base / "run" / "config.json").read_text())
    assert saved["model"]["kind"] == "file" and saved["config"]["model"].endswith("mynet.py:tiny")
    return base / "run"


def hostile(file_run, tmp_path, settings_model: str, record: dict | None):
    """A copy of the run whose config.json names `settings_model` and the model record `record`."""
    run = tmp_path / "run"
    shutil.copytree(file_run, run)
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["model"] = settings_model
    saved["config"]["dataset"] = "mnist"
    if record is None:
        saved.pop("model")
    else:
        saved["model"] = {**saved["model"], **record}
    (run / "config.json").write_text(json.dumps(saved))
    return run


def variants(tmp_path):
    """(settings model, model record) pairs, each naming code that writes tmp_path/marker."""
    evil = tmp_path / "evil.py"
    evil.write_text(evil_source(tmp_path / "marker"))
    (tmp_path / "evilmod.py").write_text(evil_source(tmp_path / "marker"))
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    name = f"{evil}:tiny"
    return {
        "registry-kind-with-a-path": (name, {"kind": "registry", "name": name}),
        "zoo-kind-with-a-path": (name, {"kind": "zoo", "name": name}),
        "zoo-prefix-with-a-path": (f"torchvision:{name}", {"kind": "zoo", "name": f"torchvision:{name}"}),
        "file-with-its-own-sha256": (name, {"kind": "file", "name": name, "path": str(evil), "sha256": digest}),
        "module": ("evilmod:tiny", {"kind": "module", "name": "evilmod:tiny"}),
        "no-model-section": (name, None),
        "settings-and-record-disagree": ("s5net", {"kind": "file", "name": name, "path": str(evil),
                                                   "sha256": digest}),
    }


def run_main(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


COMMANDS = {
    "eval": lambda run, tmp: ("eval", run),
    "predict": lambda run, tmp: ("predict", run, tmp / "digit.png"),
    "export": lambda run, tmp: ("export", run, "--format", "safetensors", "--output", tmp / "m.safetensors"),
    "resume": lambda run, tmp: ("train", "--resume", run, "--epochs", "2"),
    "config": lambda run, tmp: ("train", "--config", run / "config.json", "--out", tmp / "new", "--epochs", "1"),
    "lr-find": lambda run, tmp: ("lr-find", "--config", run / "config.json", "--output", tmp / "lr.png"),
    "summary": lambda run, tmp: ("summary", run),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("variant", ["registry-kind-with-a-path", "zoo-kind-with-a-path", "zoo-prefix-with-a-path",
                                     "file-with-its-own-sha256", "module", "no-model-section",
                                     "settings-and-record-disagree"])
def test_no_command_imports_code_a_run_folder_names(file_run, tmp_path, capsys, monkeypatch, command, variant):
    monkeypatch.chdir(tmp_path)                # evilmod.py is importable from here, as a module name would be
    monkeypatch.setattr(sys, "path", list(sys.path))
    settings_model, record = variants(tmp_path)[variant]
    run = hostile(file_run, tmp_path, settings_model, record)
    from PIL import Image
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    code, err = run_main(capsys, *COMMANDS[command](run, tmp_path))
    assert code == 2, err
    assert not (tmp_path / "marker").exists(), f"{command} imported the code {variant} names"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trainkit: error: "), err
    assert "evilmod" not in sys.modules


def test_serve_does_not_import_code_a_run_folder_names(file_run, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from trainkit.commands.serve import create_app
    monkeypatch.chdir(tmp_path)
    for variant, (settings_model, record) in variants(tmp_path).items():
        run = hostile(file_run, tmp_path / variant, settings_model, record)
        with pytest.raises(TrainkitError):
            create_app(run)
        assert not (tmp_path / "marker").exists(), variant


def test_trust_code_imports_a_file_only_while_its_sha256_matches(file_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings_model, record = variants(tmp_path)["file-with-its-own-sha256"]
    run = hostile(file_run, tmp_path, settings_model, record)
    code, err = run_main(capsys, "export", run, "--format", "safetensors", "--output", tmp_path / "a.safetensors",
                         "--trust-code")
    assert code == 0 and (tmp_path / "marker").exists() and "importing" in err   # asked for, and said
    (tmp_path / "marker").unlink()
    (tmp_path / "evil.py").write_text(evil_source(tmp_path / "marker") + "# changed\n")
    for args in (("eval", run, "--trust-code"), ("train", "--resume", run, "--epochs", "2", "--trust-code"),
                 ("train", "--config", run / "config.json", "--trust-code", "--out", tmp_path / "b")):
        code, err = run_main(capsys, *args)
        assert code == 2 and "sha256 differs" in err, (args, err)
    assert not (tmp_path / "marker").exists()


def test_resume_of_a_changed_model_file_is_refused_even_when_named(file_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(file_run, run)
    net = json.loads((run / "config.json").read_text())["model"]["path"]
    original = open(net).read()
    try:
        with open(net, "a") as f:
            f.write("# changed after training\n")
        code, err = run_main(capsys, "train", "--resume", run, "--epochs", "2", "--model", f"{net}:tiny")
        assert code == 2 and "not the file the run was trained with" in err, err
    finally:
        with open(net, "w") as f:
            f.write(original)


@pytest.mark.slow
def test_resume_of_a_file_model_asks_for_it_then_goes_on(file_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(file_run, run)
    code, err = run_main(capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 2 and "names code" in err and "--trust-code" in err
    code, err = run_main(capsys, "train", "--resume", run, "--epochs", "2", "--trust-code", "--no-progress")
    assert code == 0, err
    assert len(open(run / "metrics.csv").read().splitlines()) == 3      # header + 2 epochs
    # A finished run asked for fewer epochs than it trained says so, rather than exit 0 having done nothing.
    code, err = run_main(capsys, "train", "--resume", run, "--epochs", "1", "--trust-code")
    assert code == 2 and "fewer than the 2 epochs" in err, err


def test_registry_and_zoo_names_are_looked_up_never_imported(tmp_path):
    assert gated_model_name("c.json", "s5net", {"kind": "registry", "name": "s5net"}) == "s5net"
    assert gated_model_name("c.json", "timm:vit_base_patch16_224.augreg_in1k", None) \
        == "timm:vit_base_patch16_224.augreg_in1k"
    for bad in ("no_such_net", "torchvision:../x.py:f", "timm:/tmp/x.py:f"):
        with pytest.raises(TrainkitError):
            gated_model_name("c.json", bad, {"kind": "registry", "name": bad})
    assert "s5net" in MODELS


def test_tune_and_compare_read_hostile_run_folders_without_importing(file_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("optuna")
    monkeypatch.chdir(tmp_path)
    settings_model, record = variants(tmp_path)["file-with-its-own-sha256"]
    run = hostile(file_run, tmp_path, settings_model, record)
    compare_code, err = run_main(capsys, "compare", run, file_run)
    assert compare_code in (0, 2) and "Traceback" not in err
    # A study's folder whose first trial folder is someone's run: the trial is refused, nothing imported.
    shutil.copytree(run, tmp_path / "study" / "trial-000")
    (tmp_path / "space.yaml").write_text("lr: [0.01, 0.02]\n")
    code, err = run_main(capsys, "tune", tmp_path / "space.yaml", "--out", tmp_path / "study", "--trials", "1",
                         "--limit-train", "256", "--limit-test", "128", "--epochs", "1")
    assert code == 2 and "trial-000" in err, err         # refused before any trial runs
    assert not (tmp_path / "marker").exists()
