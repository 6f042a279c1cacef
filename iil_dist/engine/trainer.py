"""The phase loop of one rank: base model, then T phases of the configured IIL method.

Runs inside any process group (Ray Train workers, torchrun, or a single process); it knows
nothing of Ray. The orchestration layer passes a `report(metrics, checkpoint=None, name=None)`
callback; every rank calls it the same number of times, with the same metrics: after every
checkpoint epoch (with a checkpoint directory) and after every phase (with one too).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from iil_dist.config import Config, to_dict
from iil_dist.data.augment import EvalTransform, TrainTransform, normalize
from iil_dist.data.reader import (
    BadSample,
    ConcatSplit,
    InMemorySplit,
    SplitDataset,
    StreamingSplit,
    num_train_batches,
    train_batches,
)
from iil_dist.data.shards import read_manifest, verify_shards
from iil_dist.engine import checkpoint
from iil_dist.engine.checkpoint import RunState, checkpoint_name
from iil_dist.engine.deepspeed_config import deepspeed_config
from iil_dist.engine.dist import (
    all_gather_objects,
    all_reduce_sum,
    average_buffers_,
    barrier,
    check_same_on_all_ranks,
    rank,
    world_size,
)
from iil_dist.engine.evaluate import accuracies
from iil_dist.engine.faults import fault_point
from iil_dist.engine.io import atomic_write_json
from iil_dist.engine.progress import StepMeter, StepTimer, TimedTarget, format_table, grad_norm
from iil_dist.engine.teacher import Teacher
from iil_dist.engine.zero import full_state_dict
from iil_dist.method.dbd import base_losses, dbd_losses, lwf_losses
from iil_dist.method.ema import consolidation_due, num_consolidations
from iil_dist.models import build_model
from iil_dist.tracking.tracker import NullTracker, Tracker

__all__ = ["PhaseRunner", "expected_consolidations", "format_table", "split_name", "teacher_is_deployed"]

log = logging.getLogger(__name__)

Reporter = Callable[..., None]


def split_name(phase: int) -> str:
    return "base" if phase == 0 else f"phase-{phase:02d}"


def expected_consolidations(cfg: Config) -> int:
    """KC-EMA updates per incremental phase under this config (0 for methods without KC; the mean
    teacher's per-step updates depend on the phase's size)."""
    m = cfg.method
    if m.name != "dbd" or not m.consolidation:
        return 0
    return num_consolidations(
        cfg.optim.epochs_per_phase, freeze_epochs=m.freeze_epochs, every_epochs=m.ema_every_epochs
    )


def teacher_is_deployed(cfg: Config, phase: int) -> bool:
    """Whether the EMA teacher (not the student) is the model deployed after `phase`."""
    m = cfg.method
    return phase > 0 and ((m.name == "dbd" and m.consolidation) or m.name == "mean_teacher")


def uses_phase_start_model(cfg: Config) -> bool:
    """Whether a frozen copy of the phase-start model gives targets (LwF, or DBD with targets_from set so)."""
    m = cfg.method
    return m.name == "lwf" or (m.name == "dbd" and m.targets_from == "phase_start")


class NonFiniteError(RuntimeError):
    """A loss term or the gradient norm is not finite; the message names the phase, the step and the term."""


def near_chance(accuracy: float, num_classes: int) -> bool:
    """Whether a test accuracy (%) is at chance level or below 1.5 times it: the model has collapsed."""
    return accuracy < 1.5 * 100.0 / num_classes


def _no_report(metrics: dict[str, Any], checkpoint: Path | None = None, name: str | None = None) -> None:
    pass


@dataclass
class _Resume:
    """A checkpoint taken inside a phase, from which the next student is restored."""

    directory: Path
    saved: RunState
    # the partition layout changed (world size or ZeRO stage): DeepSpeed cannot re-partition the
    # optimizer state, so the student restarts from the consolidated fp32 weights
    relayout: bool = field(default=False)


class PhaseRunner:
    """Owns the teacher, builds a DeepSpeed student per phase and runs the phase loop."""

    def __init__(self, cfg: Config, run_dir: Path, report: Reporter | None = None, revision: str = "unknown") -> None:
        self.cfg = cfg
        self.revision = revision
        self.run_dir = run_dir
        self.report = report or _no_report
        self.device = torch.device("cuda", torch.cuda.current_device()) if cfg.dist.use_gpu else torch.device("cpu")
        self.scenario_dir = cfg.data.scenario_dir
        self.manifest = read_manifest(self.scenario_dir)
        if cfg.data.verify_checksums and rank() == 0:
            if cfg.data.shard_url:
                log.info("shards are streamed from %s: checked by tar structure and sample counts", cfg.data.shard_url)
            else:
                verify_shards(self.scenario_dir, self.manifest)
        barrier()
        self._check_scenario()
        self.num_classes = int(self.manifest["num_classes"])
        self.in_channels = int(self.manifest["channels"])
        size = cfg.data.crop_size or cfg.data.image_size
        # None, not a no-op transform: the loaders then skip per-sample generators altogether
        d = cfg.data
        self.train_transform = TrainTransform(d.train_transform, size) if d.train_transform != "none" else None
        self.eval_transform = EvalTransform(d.eval_transform, size) if d.eval_transform != "none" else None
        # on the device once: a tensor built from a list every step would be a host-to-device copy per step
        norm = self.manifest["normalization"]
        self.mean = torch.tensor(norm["mean"], dtype=torch.float32, device=self.device)
        self.std = torch.tensor(norm["std"], dtype=torch.float32, device=self.device)
        self.teacher = self._new_teacher()
        self.state = RunState(world_size=world_size(), zero_stage=cfg.dist.zero_stage)
        self.total_steps = self._count_steps()
        self.tracker: Tracker | NullTracker = NullTracker()
        # bad samples skipped under data.on_error=skip: those of the current phase, and every key this rank
        # has logged (each is logged once per run, not once per epoch)
        self._phase_bad: dict[tuple[str, str], BadSample] = {}
        self._logged_bad: set[tuple[str, str]] = set()
        # appended to checkpoint names; set when a run goes back to an older checkpoint, so that the ones it
        # writes again get names of their own (the storage may still list the old ones under theirs)
        self.checkpoint_suffix = ""
        # per phase run by this process: training seconds, images/s and (tracking.step_timing) the step breakdown
        self.timings: list[dict[str, Any]] = []

    def _check_scenario(self) -> None:
        want = self.cfg.data.num_phases
        have = int(self.manifest["num_phases"])
        if have != want:
            raise ValueError(
                f"{self.scenario_dir / 'manifest.json'}: scenario has {have} phases but data.num_phases is {want}; "
                "run `iil-dist prepare` with this config"
            )

    def _new_model(self) -> nn.Module:
        # parameters stay contiguous even with dist.channels_last: DeepSpeed broadcasts them as byte views
        # and ZeRO flattens them; channels_last inputs are enough for convolutions to run channels_last
        return build_model(self.cfg.model.name, num_classes=self.num_classes, in_channels=self.in_channels)

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch from the loader as the models' input: on the device, normalised, in the configured
        memory format (float32; autocast casts inside the forward under bf16)."""
        images = images.to(self.device, non_blocking=True)
        return normalize(images, self.mean, self.std, channels_last=self.cfg.dist.channels_last)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for forward passes when dist.precision is bf16: weights, gradients, optimizer
        state, BatchNorm statistics and the EMA stay fp32 (BatchNorm runs in fp32 under autocast)."""
        enabled = self.cfg.dist.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _new_teacher(self) -> Teacher:
        model = self._new_model().to(self.device)
        return Teacher(model, zero_stage=self.cfg.dist.zero_stage, micro_batch=self.cfg.optim.batch_size)

    def _open(self, split: str) -> SplitDataset | StreamingSplit | InMemorySplit:
        d = self.cfg.data
        if d.shard_url:
            dataset: SplitDataset | StreamingSplit = StreamingSplit(
                d.shard_url, split, self.manifest, on_error=d.on_error
            )
        else:
            dataset = SplitDataset(self.scenario_dir, split, self.manifest, on_error=d.on_error)
        return InMemorySplit(dataset) if d.in_memory else dataset

    def _epochs(self, phase: int) -> int:
        return self.cfg.optim.base_epochs if phase == 0 else self.cfg.optim.epochs_per_phase

    def _count_steps(self) -> int:
        """Steps of the whole run (for the progress line's ETA); joint training's phases grow."""
        total, seen = 0, 0
        for phase in range(self.cfg.data.num_phases + 1):
            n = int(self.manifest["splits"][split_name(phase)]["num_samples"])
            seen += n
            size = seen if self.cfg.method.name == "joint" else n
            total += self._epochs(phase) * num_train_batches(size, world_size(), self.cfg.optim.batch_size)
        return total

    def run(self, restore: Path | None = None) -> dict[str, Any]:
        """Runs the remaining phases (all of them, or those after the checkpoint `restore`) and returns
        the results (also written to results.json by rank 0)."""
        start = time.perf_counter()
        resume = self._restore(Path(restore)) if restore is not None else None
        if rank() == 0:
            self.tracker = Tracker(
                self.cfg, self.run_dir, self.total_steps, self.revision,
                start_step=self.state.global_step, wandb_id=self.state.wandb_id,
            )  # fmt: skip
            self.state.wandb_id = self.tracker.run_id
        test, base = self._open("test"), self._open("base")
        try:
            while self.state.phase <= self.cfg.data.num_phases:
                self._run_phase(self.state.phase, base, test, resume)
                resume = None
            results = {
                "method": self.cfg.method.name,
                "num_phases": self.cfg.data.num_phases,
                "num_consolidations": self.state.num_consolidations,
                "world_size": world_size(),
                "zero_stage": self.cfg.dist.zero_stage,
                "wall_time_s": round(time.perf_counter() - start, 2),
                "code_revision": self.revision,
                "phases": self.state.phases,
                "timing": self.timings,
                "config": to_dict(self.cfg),
            }
            if rank() == 0:
                atomic_write_json(self.run_dir / "results.json", results)
                self.tracker.summary({f"final/{k}": v for k, v in _flatten(self.state.phases[-1]).items()})
            # every rank reports once more (Ray needs equal counts); the driver keeps rank 0's results
            # in case it cannot see this node's run directory
            self.report({"results": results})
            return results
        finally:
            self.tracker.close()

    def _restore(self, directory: Path) -> _Resume | None:
        """Loads the teacher and the run state from a checkpoint; returns what the next student needs."""
        saved = checkpoint.read_state(directory)
        relayout = saved.world_size != world_size() or saved.zero_stage != self.cfg.dist.zero_stage
        if self.teacher.partitioned and not relayout:
            self.teacher.load_partition_state_(checkpoint.load_tensors(directory / f"teacher-rank{rank()}.pt"))
        else:
            self.teacher.load_full_state_dict_(checkpoint.load_tensors(directory / "teacher.pt"))
        if not relayout:
            checkpoint.restore_rng(directory)
        self.state = RunState(**{**saved.__dict__, "world_size": world_size(), "zero_stage": self.cfg.dist.zero_stage})
        log.info(
            "resumed from %s: phase %d after epoch %d, step %d, %d consolidations%s",
            directory, saved.phase, saved.epochs_done, saved.global_step, saved.num_consolidations,
            f" (saved with {saved.world_size} ranks at ZeRO-{saved.zero_stage}, now {world_size()} at "
            f"ZeRO-{self.cfg.dist.zero_stage})" if relayout else "",
        )  # fmt: skip
        if saved.epochs_done == 0:
            return None  # a phase boundary: the next student starts from the teacher
        return _Resume(directory, saved, relayout)

    def _run_phase(self, phase: int, base: Any, test: Any, resume: _Resume | None) -> None:
        """Trains, evaluates and deploys one phase, checkpointing as configured."""
        cfg, state = self.cfg, self.state
        epochs = self._epochs(phase)
        dataset = self._train_split(phase, base)
        steps_per_epoch = num_train_batches(len(dataset), world_size(), cfg.optim.batch_size)
        engine = self._build_student(phase, epochs * steps_per_epoch, state.epochs_done * steps_per_epoch, resume)
        target = self._targets(resume)
        method = cfg.method.name if phase > 0 else "base"
        log.info(
            "phase %d/%d: %s on %s (%d samples, %d epochs x %d steps, zero stage %d, %d ranks)%s",
            phase, cfg.data.num_phases, method, dataset.split, len(dataset), epochs, steps_per_epoch,
            cfg.dist.zero_stage, world_size(),
            f", from epoch {state.epochs_done + 1}" if state.epochs_done else "",
        )  # fmt: skip

        self._meter = StepMeter()
        self._timer = StepTimer(self.device) if cfg.tracking.step_timing else None
        train_start, self._trained_samples = time.perf_counter(), 0
        self._phase_bad = {}
        self._note_bad(getattr(dataset, "bad", []))  # left out when an in-memory split was decoded
        for epoch in range(state.epochs_done + 1, epochs + 1):
            self._train_epoch(phase, epoch, epochs, engine, target, dataset, method)

            # consolidation: KC-EMA after the freezing period, every ema_every_epochs epochs
            m = cfg.method
            if (
                method == "dbd"
                and m.consolidation
                and consolidation_due(epoch, freeze_epochs=m.freeze_epochs, every_epochs=m.ema_every_epochs)
            ):
                if self._timer:
                    self._timer.start()
                average_buffers_(engine.module)
                fault_point(f"consolidate@{phase}.{epoch}")
                self.teacher.consolidate_(engine, m.ema_alpha)
                if self._timer:
                    self._timer.mark("consolidation")
                state.phase_consolidations += 1
                state.num_consolidations += 1
                self.tracker.log(
                    {"ema/count": state.num_consolidations, "phase": phase, "epoch": epoch}, state.global_step
                )

            # checkpoint inside the phase; the phase's end gets its own, after evaluation
            state.epochs_done = epoch
            every = cfg.checkpoint.every_epochs
            if every and epoch % every == 0 and epoch < epochs:
                metrics = {"phase": phase, "epoch": epoch, "global_step": state.global_step}
                if self._timer:
                    self._timer.start()
                self._checkpoint(checkpoint_name(phase, epoch), metrics, engine, target)
                if self._timer:
                    self._timer.mark("checkpoint")

        # the last, partial window of the phase is recorded too, so no window mixes two phases
        if self._meter.steps:
            self._log_window(phase, epochs, epochs, self._meter, engine)
        # training throughput of the phase over all ranks (of the epochs run since a restart), kept apart
        # from the phase records: those are the run's results, the same however often it was interrupted
        train_s = time.perf_counter() - train_start
        timing = {
            "phase": phase,
            "train_s": round(train_s, 3),
            "img_per_s": round(self._trained_samples * world_size() / max(train_s, 1e-9), 1),
        }
        if self._timer:
            timing["step_ms"] = self._timer.per_step_ms()
        self.timings.append(timing)
        self.tracker.log({f"time/{k}": v for k, v in _flatten(timing).items()} | {"phase": phase}, state.global_step)

        # end of phase: make the student identical on every rank, deploy, evaluate, checkpoint
        average_buffers_(engine.module)
        if not teacher_is_deployed(cfg, phase):
            self.teacher.assign_(engine)
        record = self._evaluate(phase, engine.module, test, base)
        record.update(num_consolidations=state.phase_consolidations, global_step=state.global_step, epochs=epochs,
                      skipped_steps=state.phase_skipped_steps, **self._bad_report(phase))  # fmt: skip
        state.phases.append(record)
        state.phase, state.epochs_done, state.phase_consolidations, state.phase_skipped_steps = phase + 1, 0, 0, 0
        self._log_phase(record)
        deployed = self.teacher.full_state_dict()  # a collective under stage 3
        if rank() == 0:
            checkpoint.save_deployed(self.run_dir / "teacher.pt", phase, deployed)
        self._checkpoint(checkpoint_name(phase, epochs), {"phase": phase, **_flatten(record)}, None, None)
        engine.destroy()
        if target is not self.teacher:
            target.destroy()

    def _train_epoch(
        self, phase: int, epoch: int, epochs: int, engine: Any, target: Teacher, dataset: Any, method: str
    ) -> None:
        cfg, state = self.cfg, self.state
        engine.train()
        # seeded per (phase, epoch, rank): a resumed run draws the same noise without saved generator state
        noise = torch.Generator(device=self.device).manual_seed(
            cfg.seed * 7919 + 104729 * phase + 1299709 * epoch + rank()
        )
        bad: list[BadSample] = []
        skipping = cfg.data.on_error == "skip"
        batches = train_batches(
            dataset, epoch=epoch, seed=cfg.seed + 1000 * phase, rank=rank(),
            world_size=world_size(), batch_size=cfg.optim.batch_size, num_workers=cfg.data.loader_workers,
            transform=self.train_transform, pin_memory=cfg.dist.use_gpu, bad=bad,
        )  # fmt: skip
        timer = self._timer
        if timer:
            timer.start()
            target = TimedTarget(target, timer)
        wait_start = time.perf_counter()
        first = True  # the first batch's wait holds the reader's start: loader processes, shuffle buffer fill
        for images, labels, _ in batches:
            if bad:
                self._note_bad(bad)
                bad.clear()
            if skipping and self._skip_empty(len(labels), phase, epoch):
                state.global_step += 1
                wait_start = time.perf_counter()
                continue
            inputs = self._inputs(images)
            labels = labels.to(self.device, non_blocking=True)
            wait_s = time.perf_counter() - wait_start
            self._trained_samples += len(labels)
            if timer:
                timer.mark("data_epoch_start" if first else "data")
                timer.steps += 1
            first = False

            # losses: targets from the frozen teacher (or phase-start copy), student forward
            with self._autocast():
                if method == "dbd":
                    losses = dbd_losses(engine, target, inputs, labels, cfg.method, noise)
                elif method == "lwf":
                    losses = lwf_losses(engine, target, inputs, labels, cfg.method)
                else:  # base phase, finetune, joint, and the mean teacher's student
                    losses = base_losses(engine, inputs, labels)

            # a non-finite loss term on any rank stops the run, or skips the step on every rank alike
            if self._skip_nonfinite(losses, phase, epoch):
                state.global_step += 1
                wait_start = time.perf_counter()
                continue

            if timer:
                timer.mark("student_forward")  # the losses, and the check of every rank's loss terms

            # backward and optimizer step (DeepSpeed all-reduces and clips the gradients)
            engine.backward(losses["loss"])
            if timer:
                timer.mark("backward")
            stage0_norm = grad_norm(engine.module) if cfg.dist.zero_stage == 0 else None
            engine.step()
            if timer:
                timer.mark("optimizer")
            state.global_step += 1
            norm = stage0_norm if stage0_norm is not None else engine.get_global_grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                # the norm is global, so every rank stops here; the step is taken, the weights are spoilt
                raise NonFiniteError(
                    f"phase {phase} epoch {epoch} step {state.global_step}: the gradient norm is {float(norm)} "
                    "although every loss term was finite; the student's weights are no longer usable. Resume from "
                    "the last checkpoint with a smaller optim.lr or optim.grad_clip"
                )
            if norm is not None:
                losses["grad_norm"] = torch.as_tensor(norm, dtype=torch.float32, device=self.device)
            self._meter.add(losses, len(labels), wait_s)

            # the mean teacher: a vanilla EMA of the student after every step, no freezing period
            if method == "mean_teacher":
                average_buffers_(engine.module)
                self.teacher.consolidate_(engine, cfg.method.mt_alpha)
                state.phase_consolidations += 1
                state.num_consolidations += 1
                if timer:
                    timer.mark("consolidation")

            # metrics: a collective every log_every steps, on all ranks alike (global_step agrees)
            if state.global_step % cfg.tracking.log_every == 0:
                self._log_window(phase, epoch, epochs, self._meter, engine)
                self._meter = StepMeter()
            if timer:
                timer.mark("logging")
            wait_start = time.perf_counter()

    def _skip_empty(self, batch_len: int, phase: int, epoch: int) -> bool:
        """Whether every rank skips this step because some rank's batch held only bad samples (one more
        all-reduce per step, only under data.on_error=skip)."""
        empty = all_reduce_sum(torch.tensor([float(batch_len == 0)], device=self.device)).item()
        if not empty:
            return False
        self.state.phase_skipped_steps += 1
        log.warning(
            "phase %d epoch %d step %d: every sample of a batch was bad on %d rank(s); step skipped on every rank",
            phase, epoch, self.state.global_step + 1, int(empty),
        )  # fmt: skip
        return True

    def _note_bad(self, items: list[BadSample]) -> None:
        """Records skipped bad samples for the phase's report; logs each the first time this rank meets it."""
        for item in items:
            key = (item.split, item.key)
            self._phase_bad.setdefault(key, item)
            if key not in self._logged_bad:
                self._logged_bad.add(key)
                log.warning("skipped bad sample %s of split %s in %s: %s", *key[::-1], item.shard, item.reason)

    def _bad_report(self, phase: int) -> dict[str, Any]:
        """The phase's skipped samples over all ranks (a collective): their count and the first 100."""
        if self.cfg.data.on_error != "skip":
            return {}
        merged: dict[tuple[str, str], BadSample] = {}
        for part in all_gather_objects(self._phase_bad):
            merged.update(part)
        listed = [merged[k].__dict__ for k in sorted(merged)]
        if merged:
            log.warning("phase %d: %d bad samples skipped (results.json: bad_samples)", phase, len(merged))
        return {"bad_samples": len(merged), "bad_sample_list": listed[:100]}

    def _skip_nonfinite(self, losses: dict[str, torch.Tensor], phase: int, epoch: int) -> bool:
        """Whether to skip this step: some rank has a non-finite loss term and optim.on_nonfinite is skip.

        One small all-reduce per step: every rank learns which terms are non-finite anywhere, so all of them
        stop, or skip, together (a rank skipping alone would leave the others waiting in a collective).
        """
        names = list(losses)
        flags = torch.stack([~torch.isfinite(losses[k].detach()).all() for k in names]).float()
        ranks = all_reduce_sum(flags).tolist()
        bad = [f"{name} (on {int(n)} rank{'s' if n > 1 else ''})" for name, n in zip(names, ranks, strict=True) if n]
        if not bad:
            return False
        where = f"phase {phase} epoch {epoch} step {self.state.global_step + 1}"
        if self.cfg.optim.on_nonfinite == "stop":
            raise NonFiniteError(
                f"{where}: non-finite loss term {', '.join(bad)}; the step was not taken and the weights are intact. "
                "Set optim.on_nonfinite=skip to skip such steps instead"
            )
        self.state.phase_skipped_steps += 1
        log.warning("%s: non-finite loss term %s; step skipped on every rank", where, ", ".join(bad))
        return True

    def _build_student(self, phase: int, total_steps: int, start_step: int, resume: _Resume | None) -> Any:
        """The phase's student as a DeepSpeed engine with SGD and a cosine schedule over `total_steps`,
        starting at `start_step`; restored from `resume` when the phase is continued."""
        import deepspeed

        cfg = self.cfg
        # the student starts from the teacher (phase >= 1) or from a seeded initialisation (phase 0);
        # every rank builds the same weights and DeepSpeed broadcasts rank 0's anyway
        torch.manual_seed(cfg.seed + 1000 * phase)
        student = self._new_model()
        # DeepSpeed restores weights and optimizer state unless the partition layout changed; stage 0
        # keeps whole optimizer state, which loads into any world size
        load_engine_state = resume is not None and (
            not resume.relayout or resume.saved.zero_stage == cfg.dist.zero_stage == 0
        )
        if resume is not None and not load_engine_state:
            student.load_state_dict(checkpoint.consolidated_student(resume.directory, resume.saved.zero_stage))
        elif phase > 0 and resume is None:
            student.load_state_dict(self.teacher.full_state_dict())
        student.to(self.device)
        optimizer = torch.optim.SGD(
            student.parameters(),
            lr=cfg.optim.base_lr if phase == 0 else cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * (s + start_step) / total_steps))
        )
        engine, _, _, _ = deepspeed.initialize(
            model=student, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size())
        )
        if load_engine_state:
            # weights and optimizer state; the schedule's position comes from start_step instead
            path, _ = engine.load_checkpoint(
                str(resume.directory), tag=checkpoint.STUDENT_TAG, load_lr_scheduler_states=False
            )
            if path is None:
                raise checkpoint.CheckpointError(f"DeepSpeed could not load the student from {resume.directory}")
        if resume is not None:
            checkpoint.restore_student_buffers_(engine.module, resume.directory, resume.saved.world_size)
        if resume is not None and not load_engine_state:
            log.warning(
                "optimizer state restarts from zero: DeepSpeed cannot re-partition ZeRO-%d optimizer state "
                "for %d ranks at ZeRO-%d; the student's weights come from the consolidated checkpoint",
                resume.saved.zero_stage, world_size(), cfg.dist.zero_stage,
            )  # fmt: skip
        return engine

    def _train_split(self, phase: int, base: Any) -> Any:
        """The data phase `phase` trains on: D(0) in phase 0, D(t) after, D(0) + ... + D(t) for `joint`."""
        if phase == 0:
            return base
        if self.cfg.method.name != "joint":
            return self._open(split_name(phase))
        names = [split_name(k) for k in range(phase + 1)]
        if self.cfg.data.shard_url:
            return StreamingSplit(self.cfg.data.shard_url, names, self.manifest, on_error=self.cfg.data.on_error)
        return ConcatSplit([base, *(self._open(name) for name in names[1:])], "+".join(names))

    def _targets(self, resume: _Resume | None) -> Teacher:
        """The model that gives distillation targets this phase: the teacher, or a frozen phase-start copy."""
        if not uses_phase_start_model(self.cfg):
            return self.teacher
        target = self._new_teacher()
        if resume is not None:
            target.load_full_state_dict_(checkpoint.load_tensors(resume.directory / "target.pt"))
        else:
            target.load_full_state_dict_(self.teacher.full_state_dict())
        return target

    def _checkpoint(self, name: str, metrics: dict[str, Any], engine: Any | None, target: Teacher | None) -> None:
        """Writes this rank's part of checkpoint `name` to a local directory and reports it."""
        separate_target = target if target is not None and target is not self.teacher else None
        name += self.checkpoint_suffix
        with tempfile.TemporaryDirectory(prefix=f"iil-{name}-rank{rank()}-") as tmp:
            checkpoint.save(Path(tmp), self.state, student=engine, teacher=self.teacher, target=separate_target)
            fault_point(f"checkpoint@{name}")
            self.report(metrics, checkpoint=Path(tmp), name=name)

    def _log_window(self, phase: int, epoch: int, epochs: int, meter: StepMeter, engine: Any) -> None:
        """Records the window's mean losses (a collective); prints a console line every print_every steps."""
        step = self.state.global_step
        losses = meter.reduce()
        elapsed = time.perf_counter() - meter.start
        lr = engine.get_lr()[0]
        img_s = meter.samples * world_size() / max(elapsed, 1e-9)
        wait = meter.data_wait_s / max(elapsed, 1e-9)
        record = {f"train/{k}": v for k, v in losses.items()}
        record.update({
            "train/lr": lr, "ema/count": self.state.num_consolidations, "phase": phase, "epoch": epoch,
            "time/img_per_s": img_s, "data/wait_frac": wait,
        })  # fmt: skip
        self.tracker.log(record, step)
        if step % self.cfg.tracking.print_every:
            return
        terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k not in ("outer_frac", "grad_norm"))
        norm = f" gnorm {losses['grad_norm']:.2f}" if "grad_norm" in losses else ""
        self.tracker.progress(
            step,
            f"phase {phase}/{self.cfg.data.num_phases} epoch {epoch}/{epochs} | {terms}{norm} | "
            f"lr {lr:.4f} ema {self.state.num_consolidations} | {img_s:.0f} img/s wait {100 * wait:.0f}%",
        )

    def _evaluate(self, phase: int, student: nn.Module, test: Any, base: Any) -> dict[str, Any]:
        models = {"teacher": self.teacher.module, "student": student}
        kwargs = {
            "batch_size": self.cfg.optim.eval_batch_size, "prepare": self._inputs, "autocast": self._autocast,
            "transform": self.eval_transform, "num_workers": self.cfg.data.loader_workers,
            "pin_memory": self.cfg.dist.use_gpu,
        }  # fmt: skip
        bad: list[BadSample] = [*getattr(test, "bad", []), *getattr(base, "bad", [])]
        test_acc = accuracies(models, test, bad=bad, **kwargs)
        fault_point(f"evaluate@{phase}")
        base_acc = accuracies(models, base, bad=bad, **kwargs)
        self._note_bad(bad)
        record: dict[str, Any] = {
            "phase": phase,
            # both models must be bitwise identical on every rank; the check raises otherwise
            "teacher_fingerprint": check_same_on_all_ranks(
                self.teacher.full_state_dict(), f"teacher after phase {phase}", self.device
            ),
            "student_fingerprint": check_same_on_all_ranks(
                full_state_dict(student), f"student after phase {phase}", self.device
            ),
        }
        # the teacher entry is the deployed model (the student is assigned to it where the student is deployed)
        record["collapsed"] = near_chance(test_acc["teacher"], self.num_classes)
        if record["collapsed"]:
            log.warning(
                "phase %d: the deployed model's test accuracy %.2f%% is at chance level (%d classes): it has collapsed",
                phase, test_acc["teacher"], self.num_classes,
            )  # fmt: skip
        first = self.state.phases[0] if self.state.phases else None
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
        metrics = {f"eval/{k}": v for k, v in _flatten(record).items()} | {"phase": phase}
        self.tracker.log(metrics, self.state.global_step)
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
        elif key != "phase" and not key.endswith("fingerprint") and not isinstance(value, list):
            out[key] = value
    return out
