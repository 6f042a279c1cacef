"""The phase loop of one rank: base model, then T phases of the configured IIL method.

Runs inside any process group (Ray Train workers, torchrun, or a single process); it knows
nothing of Ray. The orchestration layer passes a `report` callback that is called on every rank
after every phase, with the same metrics on every rank.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iil_dist.config import Config, to_dict
from iil_dist.data.reader import InMemorySplit, SplitDataset, num_train_batches, train_batches
from iil_dist.data.shards import read_manifest, verify_shards
from iil_dist.engine.deepspeed_config import deepspeed_config
from iil_dist.engine.dist import (
    all_reduce_sum,
    average_buffers_,
    barrier,
    check_same_on_all_ranks,
    rank,
    world_size,
)
from iil_dist.engine.evaluate import accuracies
from iil_dist.engine.io import atomic_torch_save, atomic_write_json
from iil_dist.method.dbd import base_losses, dbd_losses
from iil_dist.method.ema import consolidate_, consolidation_due, num_consolidations
from iil_dist.models import build_model
from iil_dist.tracking.tracker import NullTracker, Tracker

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, Any]], None]


def split_name(phase: int) -> str:
    return "base" if phase == 0 else f"phase-{phase:02d}"


def expected_consolidations(cfg: Config) -> int:
    """KC-EMA updates per incremental phase under this config (0 for methods without KC)."""
    m = cfg.method
    if m.name != "dbd" or not m.consolidation:
        return 0
    return num_consolidations(
        cfg.optim.epochs_per_phase, freeze_epochs=m.freeze_epochs, every_epochs=m.ema_every_epochs
    )


def teacher_is_deployed(cfg: Config, phase: int) -> bool:
    """Whether the consolidated teacher (not the student) is the model deployed after `phase`."""
    return phase > 0 and cfg.method.name == "dbd" and cfg.method.consolidation


@dataclass
class _StepMeter:
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


class PhaseRunner:
    """Owns the teacher, builds a DeepSpeed student per phase and runs the phase loop."""

    def __init__(self, cfg: Config, run_dir: Path, report: ReportFn | None = None, revision: str = "unknown") -> None:
        self.cfg = cfg
        self.revision = revision
        self.run_dir = run_dir
        self.report = report or (lambda metrics: None)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.dist.use_gpu else torch.device("cpu")
        self.scenario_dir = cfg.data.scenario_dir
        self.manifest = read_manifest(self.scenario_dir)
        if cfg.data.verify_checksums and rank() == 0:
            verify_shards(self.scenario_dir, self.manifest)
        barrier()
        self._check_scenario()
        self.num_classes = int(self.manifest["num_classes"])
        self.in_channels = int(self.manifest["channels"])
        # the teacher is frozen and always in eval mode: its BatchNorm uses, and never updates,
        # the running statistics, so its targets are the deployed model's function
        self.teacher = self._new_model().to(self.device).eval()
        self.teacher.requires_grad_(False)
        self.global_step = 0
        self.num_consolidations = 0
        self.total_steps = self._count_steps()
        self.tracker = Tracker(cfg, run_dir, self.total_steps, revision) if rank() == 0 else NullTracker()

    def _check_scenario(self) -> None:
        want = self.cfg.data.num_phases
        have = int(self.manifest["num_phases"])
        if have != want:
            raise ValueError(
                f"{self.scenario_dir / 'manifest.json'}: scenario has {have} phases but data.num_phases is {want}; "
                "run `iil-dist prepare` with this config"
            )

    def _new_model(self) -> nn.Module:
        return build_model(self.cfg.model.name, num_classes=self.num_classes, in_channels=self.in_channels)

    def _open(self, split: str) -> SplitDataset | InMemorySplit:
        dataset = SplitDataset(self.scenario_dir, split, self.manifest)
        return InMemorySplit(dataset) if self.cfg.data.in_memory else dataset

    def _count_steps(self) -> int:
        total = 0
        for phase in range(self.cfg.data.num_phases + 1):
            n = int(self.manifest["splits"][split_name(phase)]["num_samples"])
            epochs = self.cfg.optim.base_epochs if phase == 0 else self.cfg.optim.epochs_per_phase
            total += epochs * num_train_batches(n, world_size(), self.cfg.optim.batch_size)
        return total

    def run(self) -> dict[str, Any]:
        """Runs phases 0..T and returns the results (also written to results.json by rank 0)."""
        start = time.perf_counter()
        test, base = self._open("test"), self._open("base")
        phases: list[dict[str, Any]] = []
        try:
            for phase in range(self.cfg.data.num_phases + 1):
                student, consolidations = self._train_phase(phase, base)
                record = self._evaluate(phase, student, test, base, phases[0] if phases else None)
                record["num_consolidations"] = consolidations
                record["global_step"] = self.global_step
                phases.append(record)
                self._log_phase(record)
                self.report({"phase": phase, **_flatten(record)})
            results = {
                "method": self.cfg.method.name,
                "num_phases": self.cfg.data.num_phases,
                "num_consolidations": self.num_consolidations,
                "world_size": world_size(),
                "zero_stage": self.cfg.dist.zero_stage,
                "wall_time_s": round(time.perf_counter() - start, 2),
                "code_revision": self.revision,
                "phases": phases,
                "config": to_dict(self.cfg),
            }
            if rank() == 0:
                atomic_write_json(self.run_dir / "results.json", results)
                last = phases[-1]
                self.tracker.summary({f"final/{k}": v for k, v in _flatten(last).items()})
            return results
        finally:
            self.tracker.close()

    def _train_phase(self, phase: int, base: SplitDataset | InMemorySplit) -> tuple[nn.Module, int]:
        """Trains one phase's student; returns it (plain module) and the phase's KC-EMA count."""
        cfg = self.cfg
        epochs = cfg.optim.base_epochs if phase == 0 else cfg.optim.epochs_per_phase
        dataset = base if phase == 0 else self._open(split_name(phase))
        steps_per_epoch = num_train_batches(len(dataset), world_size(), cfg.optim.batch_size)
        engine = self._build_student(phase, epochs * steps_per_epoch)
        target = self.teacher if cfg.method.targets_from == "teacher" else copy.deepcopy(self.teacher)
        noise = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + 104729 * phase + rank())
        use_dbd = phase > 0 and cfg.method.name == "dbd"
        consolidations = 0
        log.info(
            "phase %d/%d: %s on %s (%d samples, %d epochs x %d steps, zero stage %d, %d ranks)",
            phase, cfg.data.num_phases, "dbd" if use_dbd else ("base" if phase == 0 else cfg.method.name),
            split_name(phase), len(dataset), epochs, steps_per_epoch, cfg.dist.zero_stage, world_size(),
        )  # fmt: skip

        meter = _StepMeter()
        for epoch in range(1, epochs + 1):
            engine.train()
            batches = train_batches(
                dataset, epoch=epoch, seed=cfg.seed + 1000 * phase, rank=rank(),
                world_size=world_size(), batch_size=cfg.optim.batch_size,
            )  # fmt: skip
            wait_start = time.perf_counter()
            for step_in_epoch, (inputs, labels, _) in enumerate(batches, start=1):
                inputs, labels = (
                    inputs.to(self.device, non_blocking=True),
                    labels.to(self.device, non_blocking=True),
                )
                wait_s = time.perf_counter() - wait_start

                # losses: targets from the frozen teacher (or phase-start copy), student forward
                if use_dbd:
                    losses = dbd_losses(engine, target, inputs, labels, cfg.method, noise)
                else:
                    losses = base_losses(engine, inputs, labels)

                # backward and optimizer step (DeepSpeed all-reduces and clips the gradients)
                engine.backward(losses["loss"])
                stage0_norm = _grad_norm(engine.module) if cfg.dist.zero_stage == 0 else None
                engine.step()
                self.global_step += 1
                norm = stage0_norm if stage0_norm is not None else engine.get_global_grad_norm()
                if norm is not None:
                    losses["grad_norm"] = torch.as_tensor(norm, dtype=torch.float32, device=self.device)
                meter.add(losses, len(labels), wait_s)

                # metrics: a collective every log_every steps, on all ranks alike (global_step agrees)
                if self.global_step % cfg.tracking.log_every == 0:
                    self._log_window(phase, epoch, epochs, step_in_epoch, steps_per_epoch, meter, engine)
                    meter = _StepMeter()
                wait_start = time.perf_counter()

            # consolidation: KC-EMA after the freezing period, every ema_every_epochs epochs
            if (
                use_dbd
                and cfg.method.consolidation
                and consolidation_due(
                    epoch, freeze_epochs=cfg.method.freeze_epochs, every_epochs=cfg.method.ema_every_epochs
                )
            ):
                average_buffers_(engine.module)
                consolidate_(self.teacher, engine.module, cfg.method.ema_alpha)
                consolidations += 1
                self.num_consolidations += 1
                self.tracker.log(
                    {"ema/count": self.num_consolidations, "phase": phase, "epoch": epoch}, self.global_step
                )

        # the last, partial window of the phase is recorded too, so no window mixes two phases
        if meter.steps:
            self._log_window(phase, epochs, epochs, steps_per_epoch, steps_per_epoch, meter, engine)

        # end of phase: make the student identical on every rank, then deploy
        average_buffers_(engine.module)
        if not teacher_is_deployed(cfg, phase):
            self.teacher.load_state_dict(engine.module.state_dict())
        student_module = engine.module
        engine.destroy()
        if rank() == 0:
            atomic_torch_save(self.run_dir / "teacher.pt", {"phase": phase, "model": self.teacher.state_dict()})
        return student_module, consolidations

    def _build_student(self, phase: int, total_steps: int) -> Any:
        """The phase's student as a DeepSpeed engine with SGD and a cosine schedule over `total_steps`."""
        import deepspeed

        cfg = self.cfg
        # the student starts from the teacher (phase >= 1) or from a seeded initialisation (phase 0);
        # every rank builds the same weights and DeepSpeed broadcasts rank 0's anyway
        torch.manual_seed(cfg.seed + 1000 * phase)
        student = self._new_model()
        if phase > 0:
            student.load_state_dict(self.teacher.state_dict())
        student.to(self.device)
        optimizer = torch.optim.SGD(
            student.parameters(),
            lr=cfg.optim.base_lr if phase == 0 else cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps))
        )
        engine, _, _, _ = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size())
        )
        return engine

    def _log_window(
        self, phase: int, epoch: int, epochs: int, step: int, steps: int, meter: _StepMeter, engine: Any
    ) -> None:
        """Records the window's mean losses (a collective); prints a console line every print_every steps."""
        losses = meter.reduce()
        elapsed = time.perf_counter() - meter.start
        lr = engine.get_lr()[0]
        img_s = meter.samples * world_size() / max(elapsed, 1e-9)
        wait = meter.data_wait_s / max(elapsed, 1e-9)
        record = {f"train/{k}": v for k, v in losses.items()}
        record.update({
            "train/lr": lr, "ema/count": self.num_consolidations, "phase": phase, "epoch": epoch,
            "time/img_per_s": img_s, "data/wait_frac": wait,
        })  # fmt: skip
        self.tracker.log(record, self.global_step)
        if self.global_step % self.cfg.tracking.print_every:
            return
        terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k not in ("outer_frac", "grad_norm"))
        norm = f" gnorm {losses['grad_norm']:.2f}" if "grad_norm" in losses else ""
        self.tracker.progress(
            self.global_step,
            f"phase {phase}/{self.cfg.data.num_phases} epoch {epoch}/{epochs} step {step}/{steps} | {terms}{norm} | "
            f"lr {lr:.4f} ema {self.num_consolidations} | {img_s:.0f} img/s wait {100 * wait:.0f}%",
        )

    def _evaluate(
        self,
        phase: int,
        student: nn.Module,
        test: SplitDataset,
        base: SplitDataset,
        first: dict[str, Any] | None,
    ) -> dict[str, Any]:
        bs = self.cfg.optim.eval_batch_size
        models = {"teacher": self.teacher, "student": student}
        test_acc = accuracies(models, test, bs, self.device)
        base_acc = accuracies(models, base, bs, self.device)
        record: dict[str, Any] = {
            "phase": phase,
            # both models must be bitwise identical on every rank; the check raises otherwise
            "teacher_fingerprint": check_same_on_all_ranks(self.teacher, f"teacher after phase {phase}"),
            "student_fingerprint": check_same_on_all_ranks(student, f"student after phase {phase}"),
        }
        for name in models:
            # PP and F are measured against the base model M_0, the same for teacher and student
            ref_test = first["teacher"]["test_acc"] if first else test_acc[name]
            ref_base = first["teacher"]["base_acc"] if first else base_acc[name]
            record[name] = {
                "test_acc": test_acc[name],
                "base_acc": base_acc[name],
                "pp": test_acc[name] - ref_test,
                "f": ref_base - base_acc[name],
            }
        return record

    def _log_phase(self, record: dict[str, Any]) -> None:
        phase = record["phase"]
        self.tracker.log({f"eval/{k}": v for k, v in _flatten(record).items()} | {"phase": phase}, self.global_step)
        t, s = record["teacher"], record["student"]
        log.info(
            "phase %d done: teacher test %.2f base %.2f PP %+.2f F %+.2f | student test %.2f base %.2f PP %+.2f F %+.2f"
            " | consolidations %d",
            phase, t["test_acc"], t["base_acc"], t["pp"], t["f"],
            s["test_acc"], s["base_acc"], s["pp"], s["f"], record["num_consolidations"],
        )  # fmt: skip


def _flatten(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items()})
        elif key != "phase" and not key.endswith("fingerprint"):
            out[key] = value
    return out


@torch.no_grad()
def _grad_norm(model: nn.Module) -> torch.Tensor | None:
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
