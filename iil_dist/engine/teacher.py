"""The teacher: the deployed model, frozen, kept partitioned exactly like the student.

Stages 0-2: a whole eval-mode copy on every rank; consolidation averages it with the student's
whole parameters. Stage 3: an optimizer-less ZeRO-3 engine whose parameters are split like the
student's, so each rank averages only its own slice with the student's fp32 master slice: no
communication, and the same numbers as an unsharded EMA. BatchNorm buffers are never partitioned by
ZeRO; they are averaged directly (after the student's have been averaged over ranks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iil_dist.engine.zero import (
    full_state_dict,
    is_partitioned,
    load_full_state_dict_,
    local_partitions,
    student_fp32_sources,
)
from iil_dist.method.ema import ema_buffers_, ema_update_


def teacher_deepspeed_config(micro_batch: int) -> dict[str, Any]:
    """ZeRO-3 settings of the teacher engine: partition every parameter, keep none gathered.

    Stage 3 would keep parameters below `stage3_param_persistence_threshold` gathered after the
    first forward; a consolidation that writes only the partitions would then never reach them and
    the teacher's forward would use stale weights. The threshold is therefore 0.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }


class Teacher:
    """The frozen teacher; call it like a module (it runs under `torch.no_grad()`)."""

    def __init__(self, model: nn.Module, *, zero_stage: int, micro_batch: int) -> None:
        model.requires_grad_(False)
        if zero_stage == 3:
            import deepspeed

            engine, _, _, _ = deepspeed.initialize(model=model, config=teacher_deepspeed_config(micro_batch))
            model = engine.module
            self._engine = engine
        # eval mode for good: BatchNorm normalises with, and never updates, the running statistics
        self.module = model.eval()

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.module(inputs)

    @property
    def partitioned(self) -> bool:
        return is_partitioned(self.module)

    @torch.no_grad()
    def consolidate_(self, student: Any, alpha: float) -> None:
        """KC-EMA from a student engine: teacher <- alpha * teacher + (1 - alpha) * student, in fp32.

        The student's floating-point buffers must already agree across ranks (average them first);
        integer buffers (BatchNorm's num_batches_tracked) are copied.
        """
        ema_update_(local_partitions(self.module), student_fp32_sources(student), alpha)
        ema_buffers_(self.module, student.module, alpha)

    def assign_(self, student: Any) -> None:
        """Deploys the student as it is (phase 0, and methods whose student is deployed)."""
        self.consolidate_(student, 0.0)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole teacher on CPU; a collective under stage 3."""
        return full_state_dict(self.module)

    def load_full_state_dict_(self, state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict_(self.module, state)

    def partition_state(self) -> dict[str, Any]:
        """This rank's slices and the buffers, for a checkpoint that resumes with the same world size."""
        return {
            "partitions": [p.detach().cpu().clone() for p in local_partitions(self.module)],
            "buffers": {k: v.detach().cpu().clone() for k, v in self.module.named_buffers()},
        }

    @torch.no_grad()
    def load_partition_state_(self, state: dict[str, Any]) -> None:
        parts = local_partitions(self.module)
        if len(parts) != len(state["partitions"]) or any(
            p.shape != s.shape for p, s in zip(parts, state["partitions"], strict=True)
        ):
            raise ValueError("teacher partitions in the checkpoint do not match this world size and model")
        for part, saved in zip(parts, state["partitions"], strict=True):
            part.copy_(saved)
        for name, buf in self.module.named_buffers():
            buf.copy_(state["buffers"][name])

    def local_bytes(self) -> int:
        """Bytes of teacher weights and buffers held by this rank."""
        tensors = [*local_partitions(self.module), *self.module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def destroy(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.destroy()
