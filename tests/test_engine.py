"""The engine's callback protocol, the built-in callbacks, exact resume with callbacks that keep
state, and the registries of optimizers, schedulers and datasets."""
import math

import pytest
import torch
import torch.nn as nn

from trainkit import (DATASETS, OPTIMIZERS, SCHEDULERS, Callback, GradientClipping,
                      TrainConfig, fit, train)
from trainkit.checkpoint import load_checkpoint
from trainkit.loop.engine import StopRequested
from trainkit.loop.optim import build_optimizer, build_schedule

from conftest import metrics_without_time

HOOKS = ["on_fit_start", "on_epoch_start", "on_after_backward", "on_batch_end", "on_evaluate",
         "on_epoch_end", "on_fit_end"]


class Recorder(Callback):
    """Every hook call, in order, and what the state held."""

    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name in HOOKS:
            return lambda state: self.calls.append((name, state.epoch, state.batch, state))
        return super().__getattribute__(name)


def tiny_loaders(mnist, n=256, batch=64):
    x = (mnist.train_images[:n].float() / 255 - 0.1307) / 0.3081
    test_x = (mnist.test_images[:128].float() / 255 - 0.1307) / 0.3081
    make = lambda a, b, shuffle: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(a, b), batch_size=batch,
                                                             shuffle=shuffle)
    return make(x, mnist.train_labels[:n], True), make(test_x, mnist.test_labels[:128], False)


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.LogSoftmax(dim=1))


def test_hooks_run_in_order_and_see_the_model(mnist):
    train_loader, test_loader = tiny_loaders(mnist)     # plain DataLoaders: 4 batches an epoch
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder()
    history = fit(model, train_loader, test_loader, optimizer, epochs=2, callbacks=[rec], evals_per_epoch=2)
    names = [c[0] for c in rec.calls]
    per_batch = ["on_after_backward", "on_batch_end"]
    epoch = ["on_epoch_start", *per_batch * 2, "on_evaluate", *per_batch * 2, "on_evaluate", "on_epoch_end"]
    assert names == ["on_fit_start", *epoch, *epoch, "on_fit_end"]
    state = rec.calls[-1][3]
    assert state.model is model and state.optimizer is optimizer and state.history is history
    assert [(c[1], c[2]) for c in rec.calls if c[0] == "on_evaluate"] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert state.result is history[-1] and state.evaluation.acc == history[-1].test_acc


class StopAfter(Callback):
    """A custom stop rule, written without touching the engine: stop after batch `n` of epoch 2."""

    def __init__(self, n):
        self.n = n

    def on_batch_end(self, state):
        if state.epoch == 2 and state.batch == self.n:
            state.stop()


def test_a_callback_can_stop_the_run_part_way(mnist):
    train_loader, test_loader = tiny_loaders(mnist)
    model = linear()
    history = fit(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1), epochs=5,
                  callbacks=[StopAfter(1)])
    assert len(history) == 2 and history[-1].train_seen == 128     # epoch 2 ended after its 2nd batch
    assert history[-1].test_total == 128                            # and was evaluated


def test_gradient_clipping_bounds_the_norm(mnist):
    class Norms(Callback):
        def __init__(self):
            self.norms = []

        def on_after_backward(self, state):
            grads = [p.grad for p in state.model.parameters()]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    train_loader, test_loader = tiny_loaders(mnist)
    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before, after = Norms(), Norms()
    fit(model, train_loader, test_loader, opt, epochs=1, callbacks=[before, GradientClipping(0.05), after])
    assert max(before.norms) > 0.05                  # the raw gradients were larger ...
    assert max(after.norms) <= 0.05 * (1 + 1e-4)     # ... and the step saw them clipped


@pytest.mark.slow
def test_ema_is_what_is_evaluated_and_saved(mnist, tmp_path):
    cfg = TrainConfig(model="compact", epochs=1, batch_size=64, lr=0.05, ema=0.9, progress=False)
    result = train(cfg, data=mnist.limit(512, 200), out=tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    raw = result.run.model.state_dict()
    assert any(not torch.equal(saved[k].cpu(), raw[k].cpu()) for k in raw)   # model.pt is not the raw weights
    ema = load_checkpoint(tmp_path / "run" / "last.pt")["callbacks"]["EMA"]
    for k, v in saved.items():
        assert torch.equal(v, ema["module." + k].cpu()), k                    # it is the average
    with pytest.raises(Exception, match="--ema must be less than 1"):
        train(cfg.replace(ema=1.5), data=mnist.limit(64, 64), write=False)


# -- exact resume with callbacks that keep state -------------------------------------------------

RESUME_CFG = TrainConfig(model="compact", epochs=3, batch_size=64, lr=0.05, ema=0.95, patience=5,
                         clip_grad_norm=2.0, progress=False)


class InterruptAt(Callback):
    """What a SIGTERM does (SignalStop calls state.interrupt()), at a fixed step."""

    def __init__(self, epoch, batch):
        self.at = (epoch, batch)

    def on_batch_end(self, state):
        if (state.epoch, state.batch) == self.at:
            state.interrupt()


class CrashAt(Callback):
    """What a SIGKILL right after an epoch's checkpoint does: nothing more is written."""

    def on_epoch_start(self, state):
        if state.epoch == 2:
            raise RuntimeError("killed")


def weights_and_callbacks(run_dir):
    last = load_checkpoint(run_dir / "last.pt")
    return torch.load(run_dir / "model.pt", weights_only=True), last["callbacks"], last["optimizer"]["state"]


def assert_identical(a, b):
    (wa, ca, oa), (wb, cb, ob) = weights_and_callbacks(a), weights_and_callbacks(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert ca["EarlyStopping"] == cb["EarlyStopping"]
    for k in ca["EMA"]:
        assert torch.equal(ca["EMA"][k], cb["EMA"][k]), k
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    assert metrics_without_time(a) == metrics_without_time(b)


@pytest.mark.slow
def test_resume_with_ema_and_early_stopping_is_bit_identical(mnist, tmp_path):
    data = mnist.limit(768, 200)                                   # 12 batches an epoch
    train(RESUME_CFG, data=data, out=tmp_path / "straight")
    with pytest.raises(StopRequested):
        train(RESUME_CFG, data=data, out=tmp_path / "stopped", callbacks=[InterruptAt(2, 4)])
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["partial"]["batches"] == 5
    train(RESUME_CFG, data=data, resume=tmp_path / "stopped")
    assert_identical(tmp_path / "straight", tmp_path / "stopped")
    with pytest.raises(RuntimeError, match="killed"):
        train(RESUME_CFG, data=data, out=tmp_path / "crashed", callbacks=[CrashAt()])
    train(RESUME_CFG, data=data, resume=tmp_path / "crashed")
    assert_identical(tmp_path / "straight", tmp_path / "crashed")


@pytest.mark.slow
def test_early_stopping_state_survives_resume(mnist, tmp_path):
    # lr 1e-9: nothing improves after epoch 1, so patience 2 ends the run after epoch 3,
    # also when it is resumed after epoch 2 (the counter comes back from last.pt).
    cfg = TrainConfig(epochs=6, lr=1e-9, patience=2, batch_size=64, progress=False)
    data = mnist.limit(128, 64)
    with pytest.raises(RuntimeError):
        train(cfg, data=data, out=tmp_path / "run", callbacks=[CrashAt3()])
    assert load_checkpoint(tmp_path / "run" / "last.pt")["callbacks"]["EarlyStopping"]["waited"] == 1
    history = train(cfg, data=data, resume=tmp_path / "run").history
    assert len(history) == 3


class CrashAt3(Callback):
    def on_epoch_start(self, state):
        if state.epoch == 3:
            raise RuntimeError("killed")


# -- registries ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_trains(name, mnist):
    train_loader, test_loader = tiny_loaders(mnist, n=512)
    model = linear()
    optimizer = build_optimizer(model.parameters(), TrainConfig(optimizer=name, lr=0.01 if name != "sgd" else 0.1))
    history = fit(model, train_loader, test_loader, optimizer, epochs=2)
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].test_acc > 50.0


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_registered_scheduler_steps_as_declared(name, mnist):
    train_loader, test_loader = tiny_loaders(mnist)    # 4 batches an epoch
    model = linear()
    cfg = TrainConfig(scheduler=name, epochs=3, lr=0.1, step_size=1, gamma=0.5)
    optimizer = build_optimizer(model.parameters(), cfg)
    schedule = build_schedule(optimizer, cfg, len(train_loader))
    history = fit(model, train_loader, test_loader, optimizer, epochs=3, scheduler=schedule.scheduler,
                  scheduler_per_batch=schedule.per_batch)
    lrs = [r.lr for r in history]
    if name == "constant":
        assert lrs == [0.1] * 3
    else:
        assert lrs[-1] < lrs[0] or name == "onecycle" and max(lrs) > lrs[0]     # it moves the rate
        final = optimizer.param_groups[0]["lr"]
        assert final < 0.1 * 0.3                                                # and ends lower


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_registered_dataset_loads_and_trains(name, tmp_path, monkeypatch):
    """Each source's small example, from its registry entry, read and trained one step."""
    entry = DATASETS[name]
    example = entry.example(tmp_path)
    for table, key, value in example.swap:       # the example's own files' checksums
        monkeypatch.setitem(table, key, value)
    cfg = TrainConfig(dataset=example.dataset, data_dir=str(example.data_dir), model="compact", epochs=1,
                      batch_size=4, limit_train=8, limit_test=4, progress=False, device="cpu",
                      precision="fp32", channels_last="off")
    result = train(cfg, write=False)
    data = result.run.data
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == example.shape
    assert len(data.mean) == len(data.std) == data.image_shape[0]
    assert len(data.classes) >= 2 and int(data.train_labels.max()) < len(data.classes)
    assert all(0 < s for s in data.std) and all(0 <= m <= 1 for m in data.mean)
    assert result.history[0].train_seen == 8 and torch.isfinite(torch.tensor(result.history[0].train_loss))
    if entry.streams:                             # the entry says it streams: the streamed path reads it
        from trainkit.run.experiment import get_data
        streamed = get_data(cfg.replace(pipeline="stream"))
        assert streamed.image_shape == example.shape and streamed.classes == data.classes


# -- no host sync per step: the sums stay on the device, read when shown and at the epoch's end ------

def previous_loop_epoch(exp):
    """The loop as it was: the loss checked before the step, and loss.item() and a host-side sum
    every batch. The reference that the on-device sums must match bit for bit."""
    from trainkit.loop.engine import evaluate
    from trainkit.loop.devices import autocast
    sums = torch.zeros(3, dtype=torch.float64)
    exp.train_model.train()
    for x, y in exp.train_loader:
        with autocast(exp.device, exp.amp_dtype):
            out = exp.train_model(x)
            loss = exp.loss_fn(out, y)
        assert torch.isfinite(loss)
        exp.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        exp.optimizer.step()
        if exp.scheduler_per_batch:
            exp.scheduler.step()
        value, n = loss.item(), y.shape[0]
        sums += torch.tensor([value * n, (out.argmax(1) == y).sum().item(), n], dtype=torch.float64)
    test = evaluate(exp.train_model, exp.test_loader, device=exp.device, amp_dtype=exp.amp_dtype)
    return (sums[0].item() / sums[2].item(), 100.0 * sums[1].item() / sums[2].item(), int(sums[2].item())), test


@pytest.mark.parametrize("recipe", ["seed", "fast"])
def test_on_device_sums_are_bit_identical_to_per_batch_reads(recipe, mnist):
    from trainkit.config import RECIPES
    from trainkit.run.experiment import build_experiment
    data = mnist.limit(640, 200)
    cfg = TrainConfig(epochs=1, batch_size=128, progress=False, precision="fp32", channels_last="on", compile="off",
                      **{k: v for k, v in RECIPES[recipe].items() if k not in ("epochs", "batch_size")})
    first = train(cfg, data=data, write=False).history[0]
    (loss, acc, seen), (test_loss, correct, total) = previous_loop_epoch(build_experiment(cfg, data=data))
    assert (first.train_loss, first.train_acc, first.train_seen) == (loss, acc, seen)     # exactly
    assert (first.test_loss, first.test_correct, first.test_total) == (test_loss, correct, total)


class Reads(Callback):
    """What is still unread after each batch; reads the loss lazily on the batches in `read_at`."""

    def __init__(self, read_at=()):
        self.read_at, self.unread, self.losses = set(read_at), [], {}

    def on_batch_end(self, state):
        self.unread.append(len(state.unread))
        if state.batch in self.read_at:
            self.losses[state.batch] = state.loss


def test_nothing_is_read_per_batch_unless_asked(mnist):
    train_loader, test_loader = tiny_loaders(mnist, n=512)           # 8 batches of 64
    model = linear()
    reads = Reads(read_at={2, 5})
    history = fit(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1),
                  epochs=1, callbacks=[reads])
    assert reads.unread == [1, 2, 3, 1, 2, 3, 1, 2]                 # read only at batches 2 and 5 (and the end)
    assert all(math.isfinite(v) and v > 0 for v in reads.losses.values())
    assert history[0].train_seen == 512


def test_the_lazy_loss_gives_the_epoch_figures(mnist):
    train_loader, test_loader = tiny_loaders(mnist, n=512)
    model = linear()
    reads = Reads(read_at=range(8))
    history = fit(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1),
                  epochs=1, callbacks=[reads])
    total = 0.0
    for batch in range(8):
        total += reads.losses[batch] * 64
    assert total / 512 == history[0].train_loss                      # the same numbers, summed in the same order


class PoisonedAt(nn.Module):
    """A linear model whose output is NaN from training step `at` on."""

    def __init__(self, at):
        super().__init__()
        self.inner, self.at, self.calls = linear(), at, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls > self.at:
                return out * float("nan")
        return out


@pytest.mark.parametrize("read_at, found", [((), 7), ({5}, 5)])
def test_nan_is_found_at_the_next_read_and_names_its_batch(mnist, read_at, found):
    from trainkit.loop.engine import NonFiniteLoss
    train_loader, test_loader = tiny_loaders(mnist, n=512)
    model = PoisonedAt(11)                                           # epoch 2, batch 3
    reads, ends = Reads(read_at=read_at), []
    ends_cb = type("Ends", (Callback,), {"on_epoch_end": lambda self, s: ends.append(s.epoch)})()
    with pytest.raises(NonFiniteLoss, match="the training loss became nan in epoch 2, batch 3$") as caught:
        fit(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1), epochs=3,
            callbacks=[reads, ends_cb])
    assert caught.value.exit_code == 3
    assert ends == [1]                                               # epoch 2 never ends (nothing is written)
    assert len(reads.unread) == 8 + found + 1                        # found at the first read after it


def test_console_reads_as_often_as_the_bar_redraws(mnist, monkeypatch):
    from trainkit.run.reports import ConsoleLogger
    train_loader, test_loader = tiny_loaders(mnist, n=512)
    model = linear()
    logger = ConsoleLogger(progress=True, print_fn=lambda *a: None)
    reads = Reads()
    seen = []
    original = ConsoleLogger.on_epoch_start

    def slow_bar(self, state):
        original(self, state)
        self.bar.mininterval = 3600.0                                # one redraw an hour: only the first and last batch
    monkeypatch.setattr(ConsoleLogger, "on_epoch_start", slow_bar)
    after = type("After", (Callback,), {"on_batch_end": lambda self, s: seen.append(len(s.unread))})()
    fit(model, train_loader, test_loader, torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
        callbacks=[reads, logger, after])
    assert seen == [0, 1, 2, 3, 4, 5, 6, 0]


def test_a_notebook_progress_bar_leaves_a_line_of_text_for_exported_notebooks(capsys):
    """tqdm's notebook widget is invisible in an exported HTML and its saved text is its first
    state ("0/4"); the finished bar is printed as text at the epoch's end."""
    pytest.importorskip("ipywidgets")
    from tqdm.notebook import tqdm as notebook_bar

    from trainkit.loop.engine import EpochResult, TrainState
    from trainkit.run.reports import ConsoleLogger

    state = TrainState(model=None, optimizer=None, scheduler=None, train_loader=None, test_loader=None,
                       device=torch.device("cpu"), num_batches=4, epoch=1, lrs=[0.1])
    state.reset_sums()
    logger = ConsoleLogger(bar=notebook_bar)
    logger.on_epoch_start(state)
    for batch in range(4):
        state.batch = batch
        state.add_batch(batch, torch.tensor(0.5), torch.tensor(32), 64)
        logger.on_batch_end(state)
    state.result = EpochResult(1, 0.1, 0.5, 50.0, 256, 0.4, 60.0, 60, 100, 1.0)
    logger.on_epoch_end(state)
    lines = capsys.readouterr().out.splitlines()
    finished = [line for line in lines if "4/4" in line]
    assert len(finished) == 1 and "100%" in finished[0] and "Train: Loss=0.5000" in finished[0]
    assert lines[-2].startswith("Test set: Average loss: 0.4000")
