"""The Run: built once from a config (assembly.build_run), its callbacks in the one documented
order, trained by fit(run) exactly as fit(pieces), and its state_dict what a checkpoint holds."""
import signal

import pytest
import torch

from trainkit import Callback, Run, TrainConfig, build_run, fit, train
from trainkit.checkpoint import load_checkpoint
from trainkit.commands.cli import main
from trainkit.commands.lr_find import lr_sweep
from trainkit.loop.engine import StopRequested

# nothing measured (auto would time candidates), nothing compiled: quick to build
FAST = TrainConfig(model="compact", batch_size=32, progress=False, device="cpu", precision="fp32",
                   channels_last="off", compile="off")
# the keys (and their order) of every last.pt so far: runs made before the Run resume as they did
CHECKPOINT_KEYS = ["format", "epoch", "partial", "best", "finished", "config", "model_name", "model", "optimizer",
                   "scheduler", "rng", "history", "callbacks"]


class Mine(Callback):
    pass


def numbers(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history.rows()]


def test_the_callbacks_come_in_the_documented_order(mnist, tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):   # MLflowLogger sets them
        monkeypatch.setenv(name, "1")
    cfg = FAST.replace(clip_grad_norm=1.0, ema=0.9, target_acc=99.0, patience=2, final="best", evals_per_epoch=2,
                       tensorboard=True, mlflow=f"sqlite:///{tmp_path / 'mlflow.db'}")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        run = build_run(cfg, data=mnist.limit(64, 64), callbacks=[Mine()], run_dir=tmp_path / "run",
                        console=True, signals=True)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    order = [type(cb).__name__ for cb in run.callbacks]
    assert order == ["GradientClipping", "EMA", "TargetAccuracy", "EarlyStopping", "BestWeights", "ConsoleLogger",
                     "SignalStop", "Mine", "RunDirectory", "FinalReports", "CheckLog", "TensorBoardLogger",
                     "MLflowLogger"]
    assert not (tmp_path / "run").exists()       # building writes nothing: the folder is taken before fit


def test_settings_turn_the_built_in_callbacks_on(mnist, tmp_path):
    data = mnist.limit(64, 64)
    assert build_run(FAST.replace(final="last", val_split=16), data=data).callbacks == []     # no BestWeights
    mine = Mine()
    assert build_run(FAST.replace(final="last", val_split=16), data=data, callbacks=[mine]).callbacks == [mine]
    # lr-find and bench's timed steps: the callbacks of a training step alone
    steps = build_run(FAST.replace(clip_grad_norm=1.0, ema=0.9, patience=2), data=data, run_dir=tmp_path / "run",
                      console=True, steps_only=True)
    assert [type(cb).__name__ for cb in steps.callbacks] == ["GradientClipping"]


def test_fit_of_a_run_is_fit_of_its_pieces(mnist):
    cfg = FAST.replace(epochs=2, clip_grad_norm=0.5, ema=0.9)
    data = mnist.limit(256, 128)
    a = build_run(cfg, data=data)
    history = fit(a)
    assert a.history is history                 # the run keeps its history
    b = build_run(cfg, data=data)
    pieces = fit(b.train_model, b.train_loader, b.test_loader, b.optimizer, epochs=cfg.epochs, loss_fn=b.loss_fn,
                 scheduler=b.scheduler, scheduler_per_batch=b.scheduler_per_batch, device=b.device,
                 amp_dtype=b.amp_dtype, callbacks=b.callbacks)
    assert numbers(history) == numbers(pieces)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_a_runs_state_is_what_its_checkpoint_holds(mnist, tmp_path):
    cfg = FAST.replace(epochs=1, patience=3, ema=0.9)
    data = mnist.limit(128, 64)
    result = train(cfg, data=data, out=tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert list(saved) == CHECKPOINT_KEYS
    assert isinstance(result.run, Run)
    fresh = build_run(cfg, data=data)
    fresh.load_state_dict(saved)
    again = fresh.state_dict(best=saved["best"], finished=saved["finished"])
    assert list(again) == CHECKPOINT_KEYS
    assert numbers(fresh.history) == [{k: v for k, v in r.items() if k != "seconds"} for r in saved["history"]]
    assert again["callbacks"]["EarlyStopping"] == saved["callbacks"]["EarlyStopping"]
    for name, tensor in saved["model"].items():
        assert torch.equal(again["model"][name], tensor), name
    assert torch.equal(again["rng"]["torch"], saved["rng"]["torch"])


class InterruptWith(Callback):
    def on_batch_end(self, state):
        state.interrupt(15)


def test_an_interrupt_says_why(mnist):
    run = build_run(FAST.replace(epochs=1), data=mnist.limit(64, 64), callbacks=[InterruptWith()])
    with pytest.raises(StopRequested) as stopped:
        fit(run)
    assert stopped.value.reason == 15 and stopped.value.partial["batches"] == 1


def test_lr_find_honours_gradient_clipping(mnist):
    data = mnist.limit(256, 64)
    _, plain, _ = lr_sweep(FAST, steps=6, start_lr=0.05, end_lr=0.5, data=data)
    _, clipped, _ = lr_sweep(FAST.replace(clip_grad_norm=1e-4), steps=6, start_lr=0.05, end_lr=0.5, data=data)
    assert len(plain) == len(clipped) == 6
    assert plain[0] == clipped[0]                # the same first batch, before any step
    assert plain[1:] != clipped[1:]              # then the clipped steps move the weights less


@pytest.mark.parametrize("flag", [["--mlflow"], ["--mlflow-register", "m"], ["--final", "last"],
                                  ["--evals-per-epoch", "2"]])
def test_lr_find_refuses_what_it_cannot_honour_in_one_line(tmp_path, capsys, flag):
    code = main(["lr-find", *flag, "--output", str(tmp_path / "lr.png"), "--data-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"trainkit: error: lr-find does not take {flag[0]}: ")
    assert not (tmp_path / "lr.png").exists()
