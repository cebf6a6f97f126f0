"""The command line: help, flags made from the config, and one-line errors for bad input."""
import shutil

import pytest

from conftest import assert_one_line_error, cli_ok, run_cli
from trainkit.commands.cli import build_parser, config_from_args, main
from trainkit.config import TrainConfig, field_specs


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in field_specs():
        assert "--" + f.name.replace("_", "-") in text


def test_flags_override_the_recipe():
    args = build_parser().parse_args(["train", "--recipe", "fast", "--epochs", "7", "--channels-last", "off"])
    cfg, flags = config_from_args(args)
    assert cfg.epochs == 7 and cfg.channels_last == "off"
    assert cfg.scheduler == "onecycle"                 # from the recipe
    assert flags == {"epochs": 7, "channels_last": "off"}
    default, _ = config_from_args(build_parser().parse_args(["train"]))
    assert default == TrainConfig()                     # no flags: the seed recipe


@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "--epochs must be greater than 0"),
    (["--epochs", "-3"], "--epochs must be greater than 0"),
    (["--epochs", "many"], "--epochs must be an integer, got 'many'"),
    (["--batch-size", "0"], "--batch-size must be greater than 0"),
    (["--batch-size", "1.5"], "--batch-size must be an integer"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--lr", "fast"], "--lr must be a number"),
    (["--limit-train", "-1"], "--limit-train must be greater than 0"),
    (["--limit-test", "0"], "--limit-test must be greater than 0"),
    (["--momentum", "-0.5"], "--momentum must not be negative"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_values_are_one_line_errors(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--limit-train", "64", "--limit-test", "64", "--epochs", "1", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("trainkit: error: ") and fragment in err[0], err
    assert not (tmp_path / "runs").exists()            # nothing was written


def test_missing_data_folder(tmp_path):
    proc = run_cli("train", "--data-dir", tmp_path / "nowhere", "--epochs", "1", cwd=tmp_path,
                   env={"TRAINKIT_MIRROR": "http://127.0.0.1:9/"})
    assert_one_line_error(proc, "train-images-idx3-ubyte.gz is missing", "--data-dir")
    assert not (tmp_path / "runs").exists()


def test_truncated_data_file(tmp_path, mnist_dir):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(mnist_dir / "MNIST" / "raw", raw)
    (raw / "train-images-idx3-ubyte.gz").write_bytes((raw / "train-images-idx3-ubyte.gz").read_bytes()[:100_000])
    proc = run_cli("train", "--data-dir", tmp_path / "data", "--epochs", "1", cwd=tmp_path)
    assert_one_line_error(proc, "train-images-idx3-ubyte.gz is truncated or corrupt")


def test_summary_prints_the_table(tmp_path):
    proc = cli_ok("summary", "--png", tmp_path / "net.png")
    assert "Total params: 593,200" in proc.stdout
    assert "Conv2d" in proc.stdout and "[1, 256, 8, 8]" in proc.stdout
    from PIL import Image
    with Image.open(tmp_path / "net.png") as img:
        assert img.width > 300 and img.height > 300


def test_summary_takes_an_image_size_and_says_its_units(capsys):
    from trainkit.models import build_model
    from trainkit.run.reports import summary_table

    assert "Total mult-adds (M): " in summary_table(build_model("s5net"), (1, 28, 28))    # not (Units.MEGABYTES)
    assert main(["summary", "--model", "compact", "--channels", "3", "--image-size", "32x48"]) == 0
    out = capsys.readouterr().out
    assert "[1, 8, 32, 48]" in out and "Total params" in out                  # height x width
    assert main(["summary", "--model", "compact", "--image-size", "32"]) == 0  # N: a square
    assert "[1, 8, 32, 32]" in capsys.readouterr().out


@pytest.mark.slow
def test_summary_of_a_run_folder_and_the_model_help_of_run_commands(tmp_path, capsys):
    from trainkit import TrainConfig, train
    from trainkit.commands.cli import build_parser

    out = tmp_path / "run"
    train(TrainConfig(model="speednet", limit_train=128, limit_test=64, epochs=1, batch_size=64, progress=False,
                      channels=3, image_size="32", augment="none"), out=out)
    assert main(["summary", str(out)]) == 0
    table = capsys.readouterr().out
    assert "[1, 10]" in table and "32, 32]" in table                  # its 3x32x32 input and 10 classes
    assert (out / "summary.txt").read_text().count("Total mult-adds (M)") == 1
    parser = build_parser()
    for command in ("eval", "predict", "export"):
        sub = parser._subparsers._group_actions[0].choices[command]
        (model,) = [a for a in sub._actions if "--model" in a.option_strings]
        assert "default: s5net" not in model.help and "the run's own" in model.help


@pytest.mark.parametrize("argv, fragment", [
    (["lr-find", "--steps", "0"], "--steps must be greater than 0"),
    (["lr-find", "--start-lr", "-1"], "--start-lr must be greater than 0"),
    (["lr-find", "--end-lr", "1e-6"], "--end-lr (1e-06) must be greater than --start-lr"),
    (["summary", "--channels", "0"], "--channels must be greater than 0"),
    (["summary", "--classes", "-1"], "--classes must be greater than 0"),
    (["summary", "--image-size", "3"], "needs 28x28 images, these are 3x3"),
    (["summary", "--image-size", "3"], "needs 28x28 images, these are 3x3"),
    (["summary", "--image-size", "big"], "--image-size must be N or HxW"),
    (["bench", "--quick", "--steps", "0"], "--steps must be greater than 0"),
    (["bench", "--speedrun", "--seeds", "0"], "--seeds must be greater than 0"),
])
def test_other_commands_bad_values_are_one_line_errors(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trainkit: error: ") and fragment in err[0], err
