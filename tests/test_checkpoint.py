"""Checkpoints on 2 gloo ranks without Ray: their layout, DeepSpeed's zero_to_fp32 on them, resuming on
the same and on another world size, and refusing incomplete ones."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_CONFIG, SHORT, finish_rank, init_rank, spawn
from safetensors.torch import load_file

from iil_dist.config import load
from iil_dist.engine import checkpoint
from iil_dist.engine.checkpoint import CheckpointError, LocalCheckpoints
from iil_dist.engine.dist import rank
from iil_dist.engine.trainer import PhaseRunner
from iil_dist.engine.zero import full_state_dict
from iil_dist.models import build_model

STOP_AT = "phase01-epoch0002"


class _Stop(Exception):
    """Raised by the sink to stop a run right after a given checkpoint, as if the job were killed."""


class _RecordingRunner(PhaseRunner):
    """The real runner, keeping the student's whole state at every checkpoint and at every restore."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.at_checkpoint: dict[str, dict] = {}
        self.restored: dict | None = None

    def _checkpoint(self, name, metrics, engine, target):
        if engine is not None:
            self.at_checkpoint[name] = {"student": full_state_dict(engine.module)}
        self.at_checkpoint.setdefault(name, {})["teacher"] = self.teacher.full_state_dict()
        super()._checkpoint(name, metrics, engine, target)

    def _build_student(self, phase, total_steps, start_step, resume):
        engine = super()._build_student(phase, total_steps, start_step, resume)
        if resume is not None:
            optimizer = engine.optimizer
            base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
            momentum = [s.get("momentum_buffer") for s in base.state.values()]
            self.restored = {
                "student": full_state_dict(engine.module),
                "teacher": self.teacher.full_state_dict(),
                "momentum_restored": bool(momentum) and all(m is not None for m in momentum),
                "lr": engine.get_lr()[0],
            }
        return engine


def _stopping_sink(root: Path, stop_at: str | None):
    sink = LocalCheckpoints(root, keep=100)

    def report(metrics, checkpoint=None, name=None):
        sink(metrics, checkpoint, name)
        if stop_at is not None and name == stop_at:
            raise _Stop(name)

    return report


def _run_worker(
    rank_: int, world: int, port: int, scenario: str, run_dir: str, stage: int, mode: str, stop_at: str = STOP_AT
) -> None:
    """mode 'stop': run until checkpoint `stop_at`; 'resume': continue from it; 'full': run to the end."""
    init_rank(rank_, world, port)
    run = Path(run_dir)
    cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", f"dist.zero_stage={stage}", "checkpoint.every_epochs=1"])
    runner = _RecordingRunner(cfg, run, _stopping_sink(run / "checkpoints", stop_at if mode == "stop" else None))
    try:
        if mode == "resume":
            results = runner.run(restore=run / "checkpoints" / stop_at)
        else:
            results = runner.run()
    except _Stop:
        results = None
    if rank() == 0:
        torch.save(
            {"at_checkpoint": runner.at_checkpoint, "restored": runner.restored, "results": results},
            run / f"record-{mode}-world{world}.pt",
        )
    runner.teacher.destroy()
    finish_rank()


def _record(run_dir: Path, mode: str, world: int) -> dict:
    return torch.load(run_dir / f"record-{mode}-world{world}.pt", weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_layout_and_zero_to_fp32(tmp_path, tiny_scenario, stage):
    """Guards against a checkpoint that DeepSpeed's own zero_to_fp32 cannot consolidate, that lacks a
    part (teacher slices, RNG, run state), or whose student or teacher differs from the live one."""
    spawn(_run_worker, 2, str(tiny_scenario), str(tmp_path), stage, "stop")
    ckpt = tmp_path / "checkpoints" / STOP_AT
    state = checkpoint.read_state(ckpt)
    assert (state.phase, state.epochs_done, state.world_size, state.zero_stage) == (1, 2, 2, stage)
    assert state.global_step == 2 * 11 + 2 * 6 and state.num_consolidations == 1 and len(state.phases) == 1
    raw = json.loads((ckpt / "state.json").read_text())
    assert raw["data_position"] == {"phase": 1, "epoch": 3, "step_in_epoch": 0}
    names = {p.name for p in ckpt.iterdir()}
    assert {"state.json", "teacher.pt", "rng-rank0.pt", "rng-rank1.pt", "part-rank0.json", "part-rank1.json",
            "student", "zero_to_fp32.py"} <= names  # fmt: skip
    assert ("teacher-rank0.pt" in names and "teacher-rank1.pt" in names) == (stage == 3)

    # DeepSpeed's own tooling consolidates the student into a state dict that loads into the plain model
    out = tmp_path / "fp32"
    script = ckpt / "zero_to_fp32.py"
    subprocess.run(
        [sys.executable, str(script), str(ckpt), str(out), "--tag", "student", "--safe_serialization"],
        check=True, capture_output=True,
    )  # fmt: skip
    weights = load_file(out / "model.safetensors")
    live = _record(tmp_path, "stop", 2)["at_checkpoint"][STOP_AT]
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("running" in k or "num_batches" in k for k in missing)
    assert _max_diff(weights, {k: live["student"][k] for k in weights}) == 0.0
    assert _max_diff(checkpoint.load_tensors(ckpt / "teacher.pt"), live["teacher"]) == 0.0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [0, 3])
def test_resume_on_another_world_size(tmp_path, tiny_scenario, stage):
    """Guards against a checkpoint tied to its world size: written by 2 ranks it must resume on 1 (and
    one written by 1 rank on 2) with the same teacher and student weights, the optimizer state where
    DeepSpeed can re-partition it (stage 0), and the learning-rate schedule where it was."""
    for saved_world, resumed_world in ((2, 1), (1, 2)):
        run_dir = tmp_path / f"from{saved_world}"
        spawn(_run_worker, saved_world, str(tiny_scenario), str(run_dir), stage, "stop")
        live = _record(run_dir, "stop", saved_world)["at_checkpoint"][STOP_AT]
        spawn(_run_worker, resumed_world, str(tiny_scenario), str(run_dir), stage, "resume")
        record = _record(run_dir, "resume", resumed_world)
        restored = record["restored"]
        assert _max_diff(restored["student"], live["student"]) == 0.0
        assert _max_diff(restored["teacher"], live["teacher"]) == 0.0
        assert restored["momentum_restored"] == (stage == 0)
        results = record["results"]
        assert [p["phase"] for p in results["phases"]] == [0, 1, 2] and results["world_size"] == resumed_world


def _same_world_worker(rank_: int, world: int, port: int, scenario: str, run_dir: str, stage: int) -> None:
    _run_worker(rank_, world, port, scenario, run_dir, stage, "full")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [1, 3])
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, tiny_scenario, stage):
    """Guards against state a resumed run loses (teacher slices, momentum, schedule, noise, data order,
    each rank's own BatchNorm statistics): stopped mid-phase and resumed, it must end with the same
    weights as an uninterrupted run. The stop is after the first epoch of phase 1, before a consolidation
    has averaged the ranks' BatchNorm statistics: at stages 0-2 DeepSpeed saves rank 0's module only, and a
    resume that gave every rank rank 0's statistics failed here at stage 1."""
    stop_at = "phase01-epoch0001"
    spawn(_run_worker, 2, str(tiny_scenario), str(tmp_path / "full"), stage, "full")
    spawn(_run_worker, 2, str(tiny_scenario), str(tmp_path / "cut"), stage, "stop", stop_at)
    spawn(_run_worker, 2, str(tiny_scenario), str(tmp_path / "cut"), stage, "resume", stop_at)
    full = _record(tmp_path / "full", "full", 2)["results"]
    resumed = _record(tmp_path / "cut", "resume", 2)["results"]
    assert resumed["phases"] == full["phases"]  # fingerprints included: bitwise-equal teacher and student


def test_incomplete_checkpoint_is_refused(tmp_path, tiny_scenario):
    """Guards against resuming from a half-copied checkpoint: a missing or torn file is named."""
    spawn(_run_worker, 2, str(tiny_scenario), str(tmp_path), 1, "stop")
    good = tmp_path / "checkpoints" / STOP_AT
    checkpoint.read_state(good)
    for damage in ("part-rank1.json", "teacher.pt", "torn"):
        bad = tmp_path / f"bad-{damage}"
        shutil.copytree(good, bad)
        if damage == "torn":
            target = next((bad / "student").glob("zero_pp_rank_1_*optim_states.pt"))
            target.write_bytes(target.read_bytes()[:100])
            needle = target.name
        else:
            (bad / damage).unlink()
            needle = damage
        with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
            checkpoint.read_state(bad)

    # a field of the run state dropped from state.json is named; one added after the checkpoint was written
    # (here the skipped-step count) takes its default, so older checkpoints still resume
    for field, readable in (("global_step", False), ("phase_skipped_steps", True)):
        older = tmp_path / f"without-{field}"
        shutil.copytree(good, older)
        raw = json.loads((older / "state.json").read_text())
        del raw[field]
        (older / "state.json").write_text(json.dumps(raw))
        for part in older.glob("part-rank*.json"):  # the parts record each file's size: keep them consistent
            listed = json.loads(part.read_text())
            if "state.json" in listed["files"]:
                listed["files"]["state.json"] = (older / "state.json").stat().st_size
                part.write_text(json.dumps(listed))
        if readable:
            assert checkpoint.read_state(older).phase_skipped_steps == 0
        else:
            with pytest.raises(CheckpointError, match=f"missing field '{field}'"):
                checkpoint.read_state(older)


def test_local_checkpoints_keep_the_newest(tmp_path):
    """Guards against pruning the wrong checkpoints or leaving a half-merged one under a real name."""
    sink = LocalCheckpoints(tmp_path / "ckpts", keep=2)
    for name in ("phase00-epoch0001", "phase00-epoch0002", "phase01-epoch0001"):
        part = tmp_path / "part" / name
        part.mkdir(parents=True)
        (part / "state.json").write_text(name)
        sink({}, part, name)
    assert sink.names() == ["phase00-epoch0002", "phase01-epoch0001"]
    assert (sink.latest() / "state.json").read_text() == "phase01-epoch0001"
    assert not list((tmp_path / "ckpts").glob(".*"))
