"""Step metrics of the phase loop: windowed loss means, the gradient norm, the end-of-run table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from iil_dist.engine.dist import all_reduce_sum, world_size


@dataclass
class StepMeter:
    """Sums loss terms over a window of steps; reduced over ranks only when the window is recorded."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    data_wait_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, torch.Tensor], batch: int, wait_s: float) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.steps += 1
        self.samples += batch
        self.data_wait_s += wait_s

    def reduce(self) -> dict[str, float]:
        """Mean of each loss term over steps and ranks; a collective, so every rank calls it."""
        keys = sorted(self.sums)
        # the sums stay on the training device: nccl reduces only device tensors
        flat = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1)
        all_reduce_sum(flat)
        return {k: v / world_size() for k, v in zip(keys, flat.tolist(), strict=True)}


class StepTimer:
    """Where a phase's training time goes (tracking.step_timing): wall time between consecutive marks,
    charged to the section named at the later mark, with the device synchronised at every mark so that
    queued GPU work counts where it was queued. The synchronisation costs throughput: off by default."""

    def __init__(self, device: torch.device) -> None:
        self.totals: dict[str, float] = {}
        self.steps = 0
        self._cuda = device.type == "cuda"
        self._last = time.perf_counter()

    def start(self) -> None:
        """Starts a new interval without charging the time since the last mark to anything."""
        if self._cuda:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def mark(self, section: str) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[section] = self.totals.get(section, 0.0) + now - self._last
        self._last = now

    def per_step_ms(self) -> dict[str, float]:
        """Milliseconds per training step of each section (this rank)."""
        return {k: round(1000 * v / max(self.steps, 1), 4) for k, v in sorted(self.totals.items())}


class TimedTarget:
    """The teacher (or phase-start model) as the losses call it, with its forwards charged to
    `teacher_forward` and whatever ran since the last mark (the student's forwards) to `student_forward`."""

    def __init__(self, target: Any, timer: StepTimer) -> None:
        self.target, self.timer = target, timer

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.timer.mark("student_forward")
        out = self.target(inputs)
        self.timer.mark("teacher_forward")
        return out


@torch.no_grad()
def grad_norm(model: nn.Module) -> torch.Tensor | None:
    """2-norm of all gradients, before clipping; DeepSpeed clips at ZeRO stage 0 but keeps no norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def format_table(results: dict[str, Any]) -> str:
    """The per-phase table printed at the end of a run."""
    cols = f"{'base':>6} {'PP':>7} {'F':>7}"
    head = f"{'phase':>5} | {'teacher test':>12} {cols} | {'student test':>12} {cols}"
    lines = [
        f"method: {results['method']}  (accuracy in %, PP/F in points vs the base model)",
        head,
        "-" * len(head),
    ]
    for p in results["phases"]:
        t, s = p["teacher"], p["student"]
        lines.append(
            f"{p['phase']:>5} | {t['test_acc']:>12.2f} {t['base_acc']:>6.2f} {t['pp']:>+7.2f} {t['f']:>+7.2f} | "
            f"{s['test_acc']:>12.2f} {s['base_acc']:>6.2f} {s['pp']:>+7.2f} {s['f']:>+7.2f}"
        )
    return "\n".join(lines)
