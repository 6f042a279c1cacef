"""Checkpoints of a run: the student in DeepSpeed's own layout, the teacher, and where the run stands.

One checkpoint is a directory holding every rank's files (Ray Train merges the ranks' directories;
`LocalCheckpoints` does the same on a shared file system):

    state.json               rank 0: phase, epochs done, global step, consolidations, finished phase
                             records, world size, ZeRO stage, data position, wandb run id
    student/, latest         DeepSpeed `save_checkpoint` (tag "student"); absent at a phase boundary,
    zero_to_fp32.py          where the next student starts from the teacher
    student-buffers-rank{R}.pt  rank R's student buffers (BatchNorm statistics differ between ranks
                             until they are averaged at a consolidation or a phase end)
    teacher.pt               rank 0: the whole teacher (world-size independent)
    teacher-rank{R}.pt       stage 3: rank R's slices of the teacher, for a resume on the same world size
    target.pt                rank 0: the frozen phase-start model when targets come from it
    rng-rank{R}.pt           rank R's torch RNG states
    part-rank{R}.json        written last by rank R: its files and their sizes

A checkpoint is complete when every rank's part file is there and lists files of the sizes found;
`read_state` checks that before anything is loaded, so a half-copied checkpoint is refused with the
name of what is missing. Tensors are loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from iil_dist.engine.dist import barrier, rank, world_size
from iil_dist.engine.io import atomic_torch_save, atomic_write_json

log = logging.getLogger(__name__)

STUDENT_TAG = "student"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is incomplete or does not fit the run; the message names the file or field."""


@dataclass
class RunState:
    """Where a run stands: the position to continue from, and what it has produced so far."""

    phase: int = 0
    epochs_done: int = 0  # completed epochs of `phase`; 0 at a phase boundary
    global_step: int = 0
    num_consolidations: int = 0
    phase_consolidations: int = 0  # consolidations so far in `phase`
    phase_skipped_steps: int = 0  # steps of `phase` skipped for a non-finite loss (optim.on_nonfinite=skip)
    phases: list[dict[str, Any]] = field(default_factory=list)  # records of the finished phases
    world_size: int = 1
    zero_stage: int = 0
    wandb_id: str | None = None

    def data_position(self) -> dict[str, int]:
        """The next sample the run reads: epochs are seeded permutations, so (phase, epoch) is enough."""
        return {"phase": self.phase, "epoch": self.epochs_done + 1, "step_in_epoch": 0}


_LATER_FIELDS = {"phase_skipped_steps"}


def checkpoint_name(phase: int, epoch: int) -> str:
    """Name of the checkpoint taken after `epoch` of `phase`; zero-padded so that names sort in run order."""
    return f"phase{phase:02d}-epoch{epoch:04d}"


def save(
    directory: Path,
    state: RunState,
    *,
    student: Any | None,
    teacher: Any,
    target: Any | None,
) -> None:
    """Writes this rank's part of a checkpoint into `directory` (a collective: every rank calls it)."""
    directory.mkdir(parents=True, exist_ok=True)
    if student is not None:
        student.save_checkpoint(str(directory), tag=STUDENT_TAG)
        # DeepSpeed stores rank 0's module only, but each rank's BatchNorm statistics are its own
        buffers = {k: v.detach().cpu().clone() for k, v in student.module.named_buffers()}
        torch.save(buffers, directory / f"student-buffers-rank{rank()}.pt")
    teacher_state = teacher.full_state_dict()  # a collective under stage 3
    target_state = target.full_state_dict() if target is not None else None
    if teacher.partitioned:
        torch.save(teacher.partition_state(), directory / f"teacher-rank{rank()}.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, directory / f"rng-rank{rank()}.pt")
    if rank() == 0:
        torch.save(teacher_state, directory / "teacher.pt")
        if target_state is not None:
            torch.save(target_state, directory / "target.pt")
        payload = {"format_version": FORMAT_VERSION, **asdict(state), "data_position": state.data_position()}
        (directory / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    # the part file is written last: its presence and sizes mark this rank's files as complete
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith("part-rank")
    }
    atomic_write_json(directory / f"part-rank{rank()}.json", {"rank": rank(), "files": files})


def read_state(directory: Path) -> RunState:
    """Checks that the checkpoint is complete and returns its run state."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} is incomplete: {STATE_FILE} is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}")
    fields = set(RunState.__dataclass_fields__)
    # fields added to RunState later: a checkpoint written before one existed is read with its default
    missing = sorted(fields - set(raw) - _LATER_FIELDS)
    if missing:
        raise CheckpointError(f"{path}: missing field {missing[0]!r}")
    state = RunState(**{k: raw[k] for k in fields if k in raw})
    for r in range(state.world_size):
        part = directory / f"part-rank{r}.json"
        if not part.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {part.name} of rank {r} is missing")
        for name, size in json.loads(part.read_text())["files"].items():
            file = directory / name
            if not file.is_file() or file.stat().st_size != size:
                raise CheckpointError(f"checkpoint {directory} is incomplete: {name} (rank {r}) is missing or torn")
    return state


def newest_complete(directories: list[Path]) -> Path | None:
    """The newest (by name: names sort in run order) of `directories` that is a complete checkpoint;
    the incomplete ones passed over are logged with what is wrong with them."""
    for directory in sorted(directories, key=lambda p: p.name, reverse=True):
        try:
            read_state(directory)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s", directory, err)
            continue
        return directory
    return None


def load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_rng(directory: Path) -> None:
    """Restores this rank's RNG states (only meaningful when the world size is unchanged)."""
    rng = load_tensors(Path(directory) / f"rng-rank{rank()}.pt")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


@torch.no_grad()
def restore_student_buffers_(module: torch.nn.Module, directory: Path, saved_world_size: int) -> None:
    """Gives the student this rank's buffers as saved, so that a resumed run continues bitwise as the
    uninterrupted one. On another world size the saved ranks' floating-point buffers are averaged
    (what the next consolidation would do) and integer buffers taken from rank 0."""
    directory = Path(directory)
    if saved_world_size == world_size():
        saved = load_tensors(directory / f"student-buffers-rank{rank()}.pt")
    else:
        per_rank = [load_tensors(directory / f"student-buffers-rank{r}.pt") for r in range(saved_world_size)]
        saved = {
            k: torch.stack([b[k] for b in per_rank]).mean(0) if v.is_floating_point() else v
            for k, v in per_rank[0].items()
        }
    for name, buf in module.named_buffers():
        if name not in saved:
            raise CheckpointError(f"{directory}: student buffer {name!r} is missing; the model does not match")
        buf.copy_(saved[name])


def consolidated_student(directory: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """The student's whole fp32 weights from a checkpoint of any world size (DeepSpeed's zero_to_fp32)."""
    directory = Path(directory)
    if zero_stage == 0:
        # stage 0 keeps the whole module in the model-states file
        state = load_tensors(directory / STUDENT_TAG / "mp_rank_00_model_states.pt")
        return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=STUDENT_TAG)


class LocalCheckpoints:
    """Keeps checkpoints under `root` on a file system all ranks share, without Ray.

    Each rank hands over its own directory; the files are merged into `root/.NAME.tmp`, which rank 0
    renames to `root/NAME` once every rank is done, so a crash leaves no half checkpoint under a real
    name. Only the newest `keep` checkpoints are kept.
    """

    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None = None, name: str | None = None) -> None:
        if checkpoint is None:
            return
        tmp = self.root / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for src in sorted(Path(checkpoint).rglob("*")):
            if src.is_file():
                dest = tmp / src.relative_to(checkpoint)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
        barrier()
        if rank() == 0:
            final = self.root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.names()[: -self.keep]:
                shutil.rmtree(self.root / old)
        barrier()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def latest(self) -> Path | None:
        names = self.names()
        return self.root / names[-1] if names else None


def save_deployed(path: Path, phase: int, teacher_state: dict[str, torch.Tensor]) -> None:
    """The deployed teacher of the last finished phase, as a plain state dict (rank 0 writes it)."""
    atomic_torch_save(path, {"phase": phase, "model": teacher_state})
