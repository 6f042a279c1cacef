"""Several gloo ranks on one machine without Ray or a launcher, for tests and benchmarks.

`spawn` starts `world` processes that set up the process group the way Ray Train's workers do
(environment variables, gloo, then DeepSpeed on the same group). `count_collectives` records every
collective called inside a block, with the bytes it moves, to show that a code path communicates nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch

# the collectives of torch.distributed and of DeepSpeed's comm layer
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all_single", "send", "recv", "isend", "irecv", "barrier",
                "reduce", "gather", "scatter", "inference_all_reduce")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Runs fn(rank, world, port, *args) on `world` processes and waits for all of them."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world)


def init_rank(rank: int, world: int, port: int) -> None:
    """Joins the gloo process group of `spawn` as `rank` and initialises DeepSpeed's comm layer on it."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
    )  # fmt: skip
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")


def finish_rank() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


@contextlib.contextmanager
def count_collectives() -> Iterator[list[tuple[str, int]]]:
    """Records (name, bytes of the tensor arguments) for every collective called inside the block, in
    torch.distributed and deepspeed.comm (a call through both is recorded twice)."""
    import deepspeed.comm
    import torch.distributed

    calls: list[tuple[str, int]] = []
    patched: list[tuple[Any, str, Any]] = []
    for module in (torch.distributed, deepspeed.comm):
        for name in _COLLECTIVES:
            original = getattr(module, name, None)
            if original is None:
                continue

            def wrapper(*a: Any, _name: str = name, _orig: Any = original, **k: Any) -> Any:
                calls.append((_name, _tensor_bytes(list(a) + list(k.values()))))
                return _orig(*a, **k)

            setattr(module, name, wrapper)
            patched.append((module, name, original))
    try:
        yield calls
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
