"""Data-parallel training under torchrun: process-group set-up from torchrun's environment.

A plain `trainkit train` never touches torch.distributed. Under `torchrun --nproc_per_node=N`
the environment holds RANK, LOCAL_RANK and WORLD_SIZE, and each process joins one group: gloo
on CPU, nccl on CUDA.

torchrun starts its workers again in rounds (--max-restarts, or a node joining), on every node at
once, but tells them apart badly: the store it lends them outlives the rounds (a restarted worker
could read the address its dead predecessor published there), and TORCHELASTIC_RESTART_COUNT counts
only the failures of its own node (with two nodes, after a worker of node 1 died, node 0's new
workers still say 0). So each round's rank 0 opens a store of its own and publishes its address in
torchrun's store; the other ranks take it once a live store there answers with that round's token.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
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
    """True, on every rank alike, in a worker that torchrun started again (after a failure, with
    --max-restarts, or when a node joined): a group of this launch had formed before."""
    return launched_by_torchrun() and not _join_round().first


TIMEOUT = timedelta(minutes=10)
ROUND_KEY = "trainkit/round"        # in torchrun's store: "<port> <token>" of the latest round's store


@dataclass(frozen=True)
class _Round:
    store: dist.Store
    first: bool         # no earlier round of this torchrun launch got as far as publishing its store


_round: _Round | None = None        # one process takes part in one round


def _join_round() -> _Round:
    """This round's store (fresh: no keys of an earlier round), the same on every rank."""
    global _round
    if _round is not None:
        return _round
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # rank 0 hosts MASTER_PORT's store itself, new each round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
        # or a launcher of one's own); only the restart count is there to tell a restart.
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=TIMEOUT)
        _round = _Round(store, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0)
        return _round
    agent = dist.TCPStore(addr, port, world, is_master=False, timeout=TIMEOUT)
    if rank == 0:   # on the node of torchrun's store, so reachable at MASTER_ADDR too
        store = dist.TCPStore(addr, 0, world, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        token = uuid.uuid4().hex
        first = not agent.check([ROUND_KEY])
        store.set("token", token)
        store.set("first", "1" if first else "0")
        agent.set(ROUND_KEY, f"{store.port} {token}")
    else:
        store = _round_store(agent, addr, world)
        first = store.get("first") == b"1"
    _round = _Round(store, first)
    return _round


def _round_store(agent: dist.Store, addr: str, world: int) -> dist.Store:
    """A client of this round's store: the one published in torchrun's store that answers with the
    published token (a dead rank 0's address refuses the connection, or answers with another token)."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while time.monotonic() < deadline:
        port, token = agent.get(ROUND_KEY).decode().split()     # waits for the first round's rank 0
        try:
            socket.create_connection((addr, int(port)), timeout=5).close()   # a quiet probe: TCPStore logs each refusal
            store = dist.TCPStore(addr, int(port), world, is_master=False, timeout=timedelta(seconds=30))
            if store.check(["token"]) and store.get("token").decode() == token:
                store.set_timeout(TIMEOUT)
                return store
        except (OSError, dist.DistError):
            pass
        time.sleep(0.2)     # the new rank 0 has not published yet
    raise RuntimeError(f"no store of this round was published in torchrun's store at {addr} within {TIMEOUT}")


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                store=_join_round().store)
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank), device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
