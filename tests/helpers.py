"""Helpers for tests that run several real gloo ranks in spawned processes (no Ray)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp

REPO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.yaml")

# the collectives a consolidation must never call, in torch.distributed and in DeepSpeed's comm layer
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
                "reduce", "gather", "scatter", "inference_all_reduce")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Runs fn(rank, world, port, *args) on `world` gloo ranks and waits for all of them."""
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world)


def init_rank(rank: int, world: int, port: int) -> None:
    """Sets up the process group the way Ray Train does (env variables, gloo), then DeepSpeed on it."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
    )  # fmt: skip
    import deepspeed
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")


def finish_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def count_collectives() -> Iterator[list[str]]:
    """Records the name of every collective called inside the block (torch.distributed and deepspeed.comm)."""
    import deepspeed.comm
    import torch.distributed

    calls: list[str] = []
    patched: list[tuple[Any, str, Any]] = []
    for module in (torch.distributed, deepspeed.comm):
        for name in _COLLECTIVES:
            original = getattr(module, name, None)
            if original is None:
                continue

            def wrapper(*a: Any, _name: str = name, _orig: Any = original, **k: Any) -> Any:
                calls.append(_name)
                return _orig(*a, **k)

            setattr(module, name, wrapper)
            patched.append((module, name, original))
    try:
        yield calls
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


# a short experiment: 2 phases of 3 epochs after a 2-epoch base phase, KC-EMA from epoch 2
SHORT = ["data.num_phases=2", "optim.base_epochs=2", "optim.epochs_per_phase=3", "method.freeze_epochs=1",
         "tracking.log_every=5", "tracking.print_every=10", "tracking.wandb_mode=disabled"]  # fmt: skip
