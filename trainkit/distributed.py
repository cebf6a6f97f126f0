"""Data-parallel training under torchrun: process-group set-up from torchrun's environment.

A plain `trainkit train` never touches torch.distributed. Under `torchrun --nproc_per_node=N`
the environment holds RANK, LOCAL_RANK and WORLD_SIZE, and each process joins one group: gloo
on CPU, nccl on CUDA.
"""
from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun started again after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def setup(device: torch.device) -> tuple[Rank, torch.device]:
    """Join the process group when launched by torchrun; returns this process's rank and device."""
    if not launched_by_torchrun():
        return Rank(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # torchrun's store outlives a restart, and a restarted worker could read the address its
        # dead predecessor published; a key prefix per restart keeps the rounds apart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                              timeout=timedelta(minutes=10))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"trainkit/restart-{restart}", store))
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank), device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
