"""Knowledge consolidation by model EMA (KC-EMA, METHOD.md §6) as a small, testable unit."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def ema_update_(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], alpha: float) -> None:
    """In place: teacher <- alpha * teacher + (1 - alpha) * student, computed in fp32.

    Works on any matching sequence of tensors (whole parameters, or one rank's partitions under
    ZeRO-3). A teacher kept in a lower precision would round small increments away, so the
    student is cast to the teacher's dtype and the teacher is expected to be fp32.
    """
    teacher = list(teacher)
    student = [s.detach().to(t.dtype) for t, s in zip(teacher, student, strict=True)]
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - alpha)


@torch.no_grad()
def consolidate_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """KC-EMA of a whole model: parameters and floating-point buffers are averaged, integer
    buffers (BatchNorm's num_batches_tracked) are copied from the student."""
    ema_update_(teacher.parameters(), student.parameters(), alpha)
    ema_buffers_(teacher, student, alpha)


@torch.no_grad()
def ema_buffers_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """The buffer half of `consolidate_`: floating-point buffers averaged, integer buffers copied."""
    t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_buffers.keys() != s_buffers.keys():
        raise ValueError("teacher and student have different buffers; they must be the same architecture")
    floats = [name for name, b in t_buffers.items() if b.is_floating_point()]
    ema_update_((t_buffers[n] for n in floats), (s_buffers[n] for n in floats), alpha)
    for name, buf in t_buffers.items():
        if not buf.is_floating_point():
            buf.copy_(s_buffers[name])


def consolidation_due(epoch: int, *, freeze_epochs: int, every_epochs: int) -> bool:
    """Whether KC-EMA runs at the end of `epoch` (1-based): after the freezing period, every
    `every_epochs` epochs."""
    past = epoch - freeze_epochs
    return past > 0 and past % every_epochs == 0


def num_consolidations(epochs: int, *, freeze_epochs: int, every_epochs: int) -> int:
    """How many KC-EMA updates one phase of `epochs` epochs makes."""
    return max(0, epochs - freeze_epochs) // every_epochs
