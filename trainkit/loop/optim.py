"""Optimizers and learning-rate schedules, each one registered function: `--optimizer NAME`, `--scheduler NAME`.

An optimizer function takes the parameters and the config; a schedule function takes the
optimizer, the config and the number of steps in an epoch, and returns a `Schedule`: the torch
scheduler and whether it steps after every batch or every epoch (None for a constant rate).
A schedule registered with `fixed_length=True` is planned at build time for the run's epochs, so
`--resume` cannot extend its run.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterable

import torch

from ..config import TrainConfig
from ..errors import TrainkitError
from ..registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler", facts={"fixed_length": False})


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def adam(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Schedule:
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    per_batch: bool = False      # step after every batch (onecycle) rather than every epoch


@SCHEDULERS.register("constant")
def constant(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    return Schedule(None)


@SCHEDULERS.register("step")
def step(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma))


@SCHEDULERS.register("cosine", fixed_length=True)
def cosine(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """From the configured rate down to 0 over the run, updated after every batch."""
    total = cfg.epochs * steps_per_epoch
    return Schedule(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), per_batch=True)


@SCHEDULERS.register("onecycle", fixed_length=True)
def onecycle(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    total = cfg.epochs * steps_per_epoch
    if total < 3:
        raise TrainkitError(f"--scheduler onecycle needs at least 3 training steps, this run has {total}")
    warmup = min(max(cfg.pct_start, 2 / total), 0.5)   # warm up for at least one step
    return Schedule(torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                        pct_start=warmup), per_batch=True)


def build_optimizer(params: Iterable, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """The configured optimizer. `fused` (default: with --compile on) updates all the weights in one
    kernel where torch has one for the optimizer on this device (fused=True), else in a few
    (foreach=True): the compiled step's optimizer. Otherwise one tensor at a time, as the seed."""
    params = list(params)
    if not any(p.requires_grad for p in params if isinstance(p, torch.Tensor)) and \
            not any(isinstance(p, dict) for p in params):      # torch: "optimizer got an empty parameter list"
        raise TrainkitError(f"the model has no trainable parameters ({len(params)} parameters, none that "
                            f"requires a gradient): there is nothing for --optimizer {cfg.optimizer} to train")
    optimizer = OPTIMIZERS.get(cfg.optimizer)(params, cfg)
    if fused if fused is not None else cfg.compile == "on":
        optimizer = _fused(optimizer)
    return optimizer


def _fused(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with fused=True, else foreach=True, where its class and the device take them."""
    for option in ("fused", "foreach"):
        if option not in optimizer.defaults:
            continue
        groups = [{k: v for k, v in group.items() if k not in ("fused", "foreach")} for group in optimizer.param_groups]
        accepted = inspect.signature(type(optimizer)).parameters     # AdamW keeps defaults it does not take
        settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("fused", "foreach")}
        try:
            return type(optimizer)(groups, **settings, **{option: True})
        except (RuntimeError, TypeError, ValueError):   # no fused kernel for these tensors on this device
            continue
    return optimizer


def build_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    return SCHEDULERS.get(cfg.scheduler)(optimizer, cfg, steps_per_epoch)
