"""Collectives guarded so that the same code runs in one process without a process group."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` over all ranks in place and returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in rank order; for small records, not tensors."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def average_buffers_(model: nn.Module) -> None:
    """Averages floating-point buffers (BatchNorm running statistics) over all ranks.

    Data-parallel ranks update BatchNorm statistics from their own batches, so without this the
    student, and a teacher consolidated from it, would differ between ranks. Integer buffers
    advance in lockstep (every rank runs the same number of steps) and are left alone.
    """
    if not is_distributed():
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


@torch.no_grad()
def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of a state dict: equal fingerprints mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for name, value in state.items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_on_all_ranks(state: dict[str, torch.Tensor], what: str, device: torch.device | None = None) -> str:
    """Returns the state's fingerprint after checking that every rank holds the same weights.

    `device` is where the comparison is reduced: the training device (nccl reduces device tensors only).
    """
    digest = fingerprint(state)
    if is_distributed():
        value = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=device)
        low, high = value.clone(), value.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if low.item() != high.item():
            raise RuntimeError(f"{what} differs between ranks (rank {rank()} has fingerprint {digest})")
    return digest
