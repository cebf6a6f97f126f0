"""The Run, and building its pieces from a config: data, model, loaders, optimizer, schedule, loss,
device. Every choice is looked up in a registry. Its callbacks are assembly.build_run's."""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt
from ..config import TrainConfig, parse_image_size, resolve_data_dir, validate
from ..data.dataset import ImageData, warn_empty_classes
from ..data.loaders import FlipCrop, SeedAugment, TensorLoader, border_median, torchvision_loader
from ..data.registry import DATASETS, canonical_dataset, load_dataset, parse_dataset
from ..data.stream import StreamLoader, folder_to_stream, load_stream_folder
from ..errors import TrainkitError
from ..loop import distributed
from ..loop.devices import autocast_dtype, check_memory, choose, compile_unavailable, compiled, resolve_device
from ..loop.distributed import Rank
from ..loop.engine import Callback, History
from ..loop.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_schedule
from ..models import build_model, check_model_name, is_code, output_kind


@dataclass
class Run:
    """One training run: everything its config builds (data, model, loaders, optimizer, schedule,
    loss, device), its callbacks in their order, its folder (None: nothing written) and its history
    so far. build_experiment makes its pieces, assembly.build_run its callbacks; `engine.fit(run)` trains it."""

    cfg: TrainConfig
    data: ImageData                # its images a tensor, or files read in batches (--pipeline stream)
    model: nn.Module               # the module whose weights are saved
    train_model: nn.Module         # what is trained (DDP and/or the compiled module around `model`)
    train_loader: object
    test_loader: object
    val_loader: object               # None without a validation split
    optimizer: torch.optim.Optimizer
    scheduler: object
    scheduler_per_batch: bool
    loss_fn: Callable
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: Rank = Rank()
    outputs: str = "log_probs"     # what the model returns: "log_probs" or "logits"
    tuning: dict | None = None     # how --precision / --channels-last / --compile auto were resolved (devices.choose)
    callbacks: list[Callback] = field(default_factory=list)
    run_dir: Path | None = None
    history: History = field(default_factory=History)   # the finished epochs (a resumed run's too)
    partial: dict | None = None    # a resumed run's unfinished epoch, as its checkpoint holds it

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "train_loader": self.train_loader.state_dict()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.train_loader.load_state_dict(state["train_loader"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    @property
    def evals_per_epoch(self) -> int:
        return self.cfg.evals_per_epoch

    def callback(self, kind: type) -> Callback | None:
        """The run's first callback of type `kind`, if it has one."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    def state_dict(self, *, partial: dict | None = None, best: bool = False, finished: bool = False) -> dict:
        """What a checkpoint holds: weights, optimizer, schedule, every RNG, history, config, and the
        state of each callback that keeps one (early stopping's counter, an average of the weights).

        `partial` is the progress of an epoch stopped part way (by a signal), else None. `best`: this
        is the best epoch so far (best.pt holds the same bytes); `finished`: the run has ended (all
        its epochs, or stopped by a callback), so only the final files remain to be written.
        """
        return {"format": ckpt.FORMAT, "epoch": len(self.history), "partial": partial, "best": best,
                "finished": finished, "config": self.cfg.to_dict(),
                "model_name": type(self.model).__name__, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": self.rng_state(), "history": self.history.rows(),
                "callbacks": {cb.state_key: s for cb in self.callbacks if (s := cb.state_dict())}}

    def load_state_dict(self, state: dict, source: str = "the checkpoint") -> None:
        """Put a checkpoint's state back: weights, optimizer, schedule, RNGs, each callback's state,
        and the history and unfinished epoch that `fit(run)` continues from."""
        ckpt.load_weights_into(self.model, state["model"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.set_rng_state(state["rng"])
            saved = state.get("callbacks", {})
            for cb in self.callbacks:
                if cb.state_key in saved:
                    cb.load_state_dict(saved[cb.state_key])
            self.history, self.partial = History.from_rows(state["history"]), state.get("partial")
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise TrainkitError(f"{source} does not match this run's optimizer, schedule or callbacks ({exc})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_names(cfg: TrainConfig, own_model: bool = False) -> None:
    """Fail before any data is read on a name that no registry knows."""
    validate(cfg)
    if not own_model:
        check_model_name(cfg.model)
    parse_dataset(cfg.dataset).entry
    OPTIMIZERS.get(cfg.optimizer)
    SCHEDULERS.get(cfg.scheduler)


def canonical(cfg: TrainConfig) -> TrainConfig:
    """The same settings with every path made absolute (the data folder, an image folder, a model
    file), so that a run's config.json means the same from any working folder."""
    changes = {"data_dir": str(resolve_data_dir(cfg).resolve())}
    if cfg.init_from:
        changes["init_from"] = str(Path(cfg.init_from).resolve())
    changes["dataset"] = str(canonical_dataset(parse_dataset(cfg.dataset)))
    if is_code(cfg.model) and cfg.model.rpartition(":")[0].endswith(".py"):
        target, _, attr = cfg.model.rpartition(":")
        changes["model"] = f"{Path(target).resolve()}:{attr}"
    return cfg.replace(**changes)


def describe(cfg: TrainConfig, data: ImageData | None, model: nn.Module | None) -> TrainConfig:
    """The config a run records: canonical, and naming a model or data given as Python objects
    as such ("python:NAME"), so that nothing later mistakes them for the configured ones."""
    cfg = canonical(cfg)
    if model is not None:
        cfg = cfg.replace(model=f"python:{type(model).__name__}")
    if data is not None:
        loadable = parse_dataset(data.name).source in DATASETS
        cfg = cfg.replace(dataset=data.name if loadable else f"python:{data.name}")
    return cfg


def load_initial_weights(model: nn.Module, source: Path) -> None:
    """--init-from: a run folder (its model.pt, else last.pt), a checkpoint, or a weights file."""
    if source.is_dir():
        source = source / "model.pt" if (source / "model.pt").is_file() else source / "last.pt"
    state = ckpt.load_weights(source)
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT:   # a whole checkpoint
        state = state.get("model")
    ckpt.load_weights_into(model, state, str(source))


def get_data(cfg: TrainConfig, channels: int | None = None, size: tuple[int, int] | None = None,
             device: torch.device | None = None, before_manifests: bool = False) -> ImageData:
    """The configured data; `channels` and `size` (eval: the run's) override --channels / --image-size.
    An image folder's images are files (FileImages) when --pipeline says to stream it (stream.py).
    `before_manifests`: read as trainkit did before runs recorded data.json (a flat folder split
    from seed 0, the first --limit images), so that eval and --resume of such a run see its data."""
    channels, size = channels or cfg.channels, size or parse_image_size(cfg.image_size)
    spec = parse_dataset(cfg.dataset)
    seed = 0 if before_manifests else cfg.seed
    files = folder_to_stream(spec, cfg.pipeline, channels, size, device, seed)
    if files is not None:
        data = load_stream_folder(Path(spec.arg), channels, size, files, cfg.bad_files, cfg.resize)
        return data.limit(cfg.limit_train, cfg.limit_test) if before_manifests else \
            data.subset(cfg.limit_train, cfg.limit_test, seed)
    return load_dataset(spec, resolve_data_dir(cfg), channels=channels, size=size, progress=cfg.progress,
                        limit_train=cfg.limit_train, limit_test=cfg.limit_test, first=before_manifests, seed=seed,
                        bad_files=cfg.bad_files, resize=cfg.resize)


def warn_unchecked_data(cfg: TrainConfig) -> None:
    """The line for a run from before data.json (get_data's `before_manifests`), said once the run
    could be opened: its data is read as trainkit read it then, and cannot be checked."""
    print(f"trainkit: warning: the run predates data.json, so the {cfg.dataset} data read now cannot be "
          f"checked against what it was trained on (read as trainkit read it then)", file=sys.stderr)


def augmentation(cfg: TrainConfig, data: ImageData) -> str:
    """--augment, with auto resolved: the seed's for 1-channel images (digits), flip-crop for colour."""
    if cfg.augment != "auto":
        return cfg.augment
    return "seed" if data.image_shape[0] == 1 else "flip-crop"


def seed_augment(images: torch.Tensor) -> SeedAugment:
    """The seed's augmentation, filling what rotation uncovers with black where the images' borders
    are black (MNIST: exactly the seed's), else with each image's own border colour."""
    sample = images[:1024].float()                       # (n, C, H, W): enough to tell
    black = len(sample) == 0 or not bool(border_median(sample).any())
    return SeedAugment(fill_border=not black)


def held_out(cfg: TrainConfig, data: ImageData) -> ImageData:
    """The data with its validation split, when the config asks for one."""
    if cfg.val_split is not None and data.val_labels is not None:
        raise TrainkitError(f"--val-split {cfg.val_split}: {data.name} has its own validation split (a val/ folder); "
                            f"leave --val-split out")
    if cfg.val_split is None:
        if cfg.final == "last" and data.val_labels is None:
            # no validation split, no best epoch to choose against: the flag would silently do nothing
            raise TrainkitError("--final last chooses the last epoch's weights over the best validation epoch's, so "
                                "it needs a validation split (--val-split, or a val/ folder); without one the run "
                                "ends with the last epoch's weights anyway: leave --final out")
        return data
    return data.split_validation(cfg.val_split, seed=cfg.seed)


def held_out_line(cfg: TrainConfig, data: ImageData) -> str:
    """The data's sizes as the run reads them, once --val-split has held its images out of the
    training ones (which a dataset's own line counted whole): counts that add up."""
    train, val, test = len(data.train_labels), len(data.val_labels), len(data.test_labels)
    return (f"Validation split (--val-split {cfg.val_split:g}): {val:,} of the {train + val:,} training images "
            f"held out; the run reads {train:,} training, {val:,} validation and {test:,} test images")


def make_loaders(cfg: TrainConfig, data: ImageData, device: torch.device, rank: int = 0,
                 world: int = 1):
    """(train, test, validation or None) loaders: the fast path on the device, the seed's
    torchvision pipeline, or files read in batches by workers (streamed data): the same loader
    type (a PlannedLoader) for a tensor and for files."""
    kind = augmentation(cfg, data)
    if data.streamed or cfg.pipeline in ("tensor", "auto"):
        # what seed_augment looks at: the first images (of files: the first 1,024, decoded here)
        first = lambda: data.train_images.read(range(min(1024, len(data.train_images)))) if data.streamed \
            else data.train_images
        augment = {"seed": lambda: seed_augment(first()), "flip-crop": FlipCrop, "none": lambda: None}[kind]()
        common = dict(mean=data.mean, std=data.std, device=device, channels_last=cfg.channels_last == "on",
                      rank=rank, world=world)
        loader = StreamLoader if data.streamed else TensorLoader
        train = loader(data.train_images, data.train_labels, cfg.batch_size, shuffle=True, augment=augment,
                       seed=cfg.seed, **({"persistent": True} if data.streamed else {}), **common)
        evaluation = lambda images, labels: loader(images, labels, cfg.test_batch_size, **common)
    else:
        common = dict(mean=data.mean, std=data.std, seed=cfg.seed, workers=cfg.workers,
                      pin_memory=device.type == "cuda", rank=rank, world=world)
        train = torchvision_loader(data.train_images, data.train_labels, cfg.batch_size,
                                   train=kind != "none", augment=kind, **common)
        evaluation = lambda images, labels: torchvision_loader(images, labels, cfg.test_batch_size, train=False,
                                                               **common)
    val = evaluation(data.val_images, data.val_labels) if data.val_images is not None else None
    return train, evaluation(data.test_images, data.test_labels), val


def resolved_pipeline(cfg: TrainConfig, data: ImageData) -> str:
    """--pipeline with auto resolved, as the run records it (so --resume and eval read the data the
    same way): stream for streamed data, else tensor."""
    streamed = data.streamed
    if cfg.pipeline == "auto":
        return "stream" if streamed else "tensor"
    if streamed != (cfg.pipeline == "stream"):
        raise TrainkitError(f"--pipeline {cfg.pipeline} cannot take {'streamed data' if streamed else 'data held in memory'}; "
                            f"use --pipeline {'stream' if streamed else 'tensor'} (or auto)")
    return cfg.pipeline


def evaluation_loader(data: ImageData, batch_size: int, mean, std, device="cpu"):
    """The whole test set in batches, held or streamed as the data is."""
    loader = StreamLoader if data.streamed else TensorLoader
    return loader(data.test_images, data.test_labels, batch_size, mean=mean, std=std, device=device)


def make_loss(cfg: TrainConfig, outputs: str) -> Callable:
    """Cross-entropy on the model's output, logits or log-probabilities alike. For a model that
    returns log-probabilities (the seed's) without label smoothing, nll_loss is the same loss and
    keeps the seed recipe's numbers bit for bit (cross_entropy would apply log_softmax once more)."""
    if outputs == "log_probs" and not cfg.label_smoothing:
        return lambda out, y: F.nll_loss(out.float(), y)
    return lambda out, y: F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)


def build_experiment(cfg: TrainConfig, *, data: ImageData | None = None,
                     model: nn.Module | None = None, before_manifests: bool = False) -> Run:
    """Build every piece of a run from `cfg`; `data` and `model` replace the configured ones
    (`before_manifests`: get_data's, for resuming a run made before data.json).

    Under torchrun this process joins the group and trains its share with DistributedDataParallel.
    """
    check_names(cfg, own_model=model is not None)
    cfg = describe(cfg, data, model)
    ranks, device = distributed.setup(resolve_device(cfg.device))
    if cfg.batch_size % ranks.world:
        raise TrainkitError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly "
                            f"among the {ranks.world} processes")
    if cfg.compile == "on" and (missing := compile_unavailable(device)):
        raise TrainkitError(f"--compile on: {missing}; install one (g++) or use --compile off")
    seed_everything(cfg.seed)
    if device.type == "cuda":  # same seed, same flags, same numbers: no non-deterministic cuDNN kernels
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    data = held_out(cfg, data if data is not None else get_data(cfg, device=device, before_manifests=before_manifests))
    cfg = cfg.replace(pipeline=resolved_pipeline(cfg, data))
    if model is None:
        model = build_model(cfg.model, in_channels=data.image_shape[0], num_classes=data.num_classes,
                            pretrained=cfg.pretrained)
    if cfg.init_from:
        load_initial_weights(model, Path(cfg.init_from))
    model = model.to(device)
    outputs = output_kind(model, data.image_shape, data.num_classes, cfg.model, device)
    if ranks.is_main:       # once the run can go on: a refusal above stays one line
        if cfg.val_split is not None:
            print(held_out_line(cfg, data), flush=True)
        warn_empty_classes(data, test_too=cfg.limit_test is None)   # --limit-test's subset warns for itself
    tuning = choose_settings(cfg, model, data, make_loss(cfg, outputs), device, ranks.world)
    cfg = cfg.replace(**tuning["choice"])     # what ran is what config.json and the checkpoints record
    if cfg.channels_last == "on":
        model = model.to(memory_format=torch.channels_last)
    train_model = model
    if ranks.world > 1:  # DDP starts every rank from rank 0's weights and averages gradients
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile == "on":     # evaluation runs `model` itself (engine.uncompiled): no graph to compile for it
        train_model = compiled(train_model)
    train_loader, test_loader, val_loader = make_loaders(cfg, data, device, ranks.rank, ranks.world)
    optimizer = build_optimizer(model.parameters(), cfg)
    schedule = build_schedule(optimizer, cfg, len(train_loader))
    return Run(cfg, data, model, train_model, train_loader, test_loader, val_loader, optimizer,
                      schedule.scheduler,
                      schedule.per_batch, make_loss(cfg, outputs), device, autocast_dtype(cfg.precision, device), ranks,
                      outputs, tuning)


def choose_settings(cfg: TrainConfig, model: nn.Module, data: ImageData, loss_fn: Callable,
                    device: torch.device, world: int = 1) -> dict:
    """--precision, --channels-last and --compile with `auto` resolved by timing a few steps
    (devices.choose) of a copy of `model` on a batch of this run's shape; compiling is weighed
    against the run's planned steps. The seed's pipeline stays in fp32.

    Checked first, since each is one line and the timing may take a while: an optimizer with
    nothing to train, a schedule the run is too short for, and a batch whose step cannot fit in
    memory. The batch timed is at most the images there are (--batch-size 100000 of 2,048 images
    trains batches of 2,048)."""
    train_size = len(data.train_labels) if getattr(data, "train_labels", None) is not None else len(data.train)
    steps_per_epoch = math.ceil(train_size / cfg.batch_size)
    build_schedule(build_optimizer(model.parameters(), cfg), cfg, steps_per_epoch)
    precision = "fp32" if cfg.pipeline == "torchvision" and cfg.precision == "auto" else cfg.precision
    batch = max(1, min(cfg.batch_size, train_size) // world)
    few = torch.Generator().manual_seed(0)           # the run's own generators are not touched
    x = torch.randn(min(batch, 2), *data.image_shape, generator=few).to(device)
    y = torch.randint(0, data.num_classes, (len(x),), generator=few).to(device)
    check_memory(model, loss_fn, x, y, batch, f"--batch-size {cfg.batch_size} with {cfg.model} on "
                                              f"{list(data.image_shape)} images")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *data.image_shape, generator=generator).to(device)
    y = torch.randint(0, data.num_classes, (batch,), generator=generator).to(device)
    shapes = 1 if train_size <= cfg.batch_size or train_size % cfg.batch_size == 0 else 2   # a shorter last batch
    return choose(model, lambda params, fused=False: build_optimizer(params, cfg, fused=fused), loss_fn, x, y,
                  precision=precision, channels_last=cfg.channels_last, name=cfg.model, compile=cfg.compile,
                  steps=cfg.epochs * steps_per_epoch, shapes=shapes)
