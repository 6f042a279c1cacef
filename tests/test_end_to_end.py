"""End to end: `iil-dist train` on a real local Ray cluster with DeepSpeed workers (gloo, fp32), including
a worker killed mid-phase (automatic recovery, and `--resume` after a failed run)."""

import json
import os
import re
import signal
import threading
from pathlib import Path

import pytest
import torch

from iil_dist import cli
from iil_dist.config import load
from iil_dist.engine.trainer import expected_consolidations

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "data.num_phases=2", "optim.base_epochs=3", "optim.epochs_per_phase=4", "method.freeze_epochs=1",
    "method.ema_every_epochs=1", "tracking.log_every=5", "tracking.print_every=10",
    "optim.batch_size=32",
]  # fmt: skip


def _overrides(tmp_path: Path, scenario: Path, name: str, extra: list[str]) -> list[str]:
    return [*TINY, f"data.root={scenario}", f"run_root={tmp_path / 'runs'}", f"name={name}", *extra]


def _train(tmp_path: Path, scenario: Path, name: str, extra: list[str]) -> tuple[dict, Path]:
    assert cli.main(["train", str(REPO / "configs" / "digits.yaml"), *_overrides(tmp_path, scenario, name, extra)]) == 0
    run_dir = tmp_path / "runs" / name
    return json.loads((run_dir / "results.json").read_text()), run_dir


# the reference of the recovery tests: 2 workers, ZeRO-1, DBD + KC-EMA, checkpoints only at phase ends
ZERO1 = ["dist.zero_stage=1", "dist.num_workers=2"]


# a wandb API key in the environment of the run, which must never be written anywhere in the run directory
SECRET_KEY = os.urandom(20).hex()


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory: pytest.TempPathFactory, tiny_scenario: Path) -> tuple[dict, Path]:
    """One uninterrupted run, shared by the spine test and the recovery tests (a Ray fit costs ~25 s)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_API_KEY", SECRET_KEY)
        return _train(tmp_path_factory.mktemp("zero1"), tiny_scenario, "dbd", ZERO1)


def _check_results(results: dict, num_phases: int) -> None:
    assert isinstance(results["method"], str) and results["num_phases"] == num_phases
    assert [p["phase"] for p in results["phases"]] == list(range(num_phases + 1))
    for p in results["phases"]:
        assert p["skipped_steps"] == 0 and p["collapsed"] is False
        for model in ("teacher", "student"):
            m = p[model]
            assert set(m) >= {"test_acc", "base_acc", "pp", "f"}
            assert all(isinstance(m[k], float) for k in ("test_acc", "base_acc", "pp", "f"))
            assert 0.0 <= m["test_acc"] <= 100.0 and 0.0 <= m["base_acc"] <= 100.0
    first = results["phases"][0]
    assert first["teacher"]["pp"] == first["teacher"]["f"] == first["student"]["pp"] == first["student"]["f"] == 0.0
    base = first["teacher"]
    for p in results["phases"]:
        for model in ("teacher", "student"):
            m = p[model]
            assert m["pp"] == pytest.approx(m["test_acc"] - base["test_acc"])
            assert m["f"] == pytest.approx(base["base_acc"] - m["base_acc"])


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dbd_two_workers_zero1(zero1_run):
    """Guards against a broken spine: Ray + DeepSpeed + shards + DBD/KC-EMA + eval + results + wandb."""
    results, run_dir = zero1_run
    _check_results(results, 2)
    assert results["method"] == "dbd" and results["world_size"] == 2 and results["zero_stage"] == 1
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", results["code_revision"])

    # the teacher was consolidated exactly as configured: (4 epochs - 1 frozen) / 1 per phase
    cfg = load(REPO / "configs" / "digits.yaml", TINY)
    assert expected_consolidations(cfg) == 3
    assert [p["num_consolidations"] for p in results["phases"]] == [0, 3, 3]
    assert results["num_consolidations"] == 6
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ema_counts = [r["ema/count"] for r in records if set(r) == {"step", "time_s", "ema/count", "phase", "epoch"}]
    assert ema_counts == list(range(1, 7))

    # the KC-EMA teacher is deployed, so after a phase it differs from the student
    last = results["phases"][-1]
    assert last["teacher_fingerprint"] != last["student_fingerprint"]

    # every loss term is tracked separately, with lr and img/s
    train = [r for r in records if "train/loss" in r]
    assert train and all({"train/lr", "time/img_per_s", "ema/count"} <= set(r) for r in train)
    assert any("train/fl" in r and "train/dis" in r for r in train)
    assert all(r["train/grad_norm"] > 0 for r in train)
    # records every log_every steps, plus the partial window that ends each phase
    assert [r["step"] for r in train if r["phase"] == 0] == [5, 10, 15, 20, 25, 30, 33]

    # the console: one progress line every print_every steps, with phase, epoch, step, losses, img/s, ETA
    rank0_log = (run_dir / "logs" / "rank0.log").read_text()
    progress = [line for line in rank0_log.splitlines() if " eta " in line]
    assert len(progress) == results["phases"][-1]["global_step"] // 10
    assert re.search(r"phase 1/2 epoch \d+/4 \| dis [\d.]+ fl [\d.]+ loss [\d.]+ gnorm", rank0_log)
    assert re.search(r"img/s .* \| step 20/\d+ \| eta \d+:\d\d:\d\d", rank0_log)

    # wandb offline run on rank 0 only: one run directory with a non-empty run file
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and wandb_files[0].stat().st_size > 0
    assert (run_dir / "logs" / "rank0.log").exists() and (run_dir / "logs" / "rank1.log").exists()

    # the deployed teacher is saved and loads into a plain model
    saved = torch.load(run_dir / "teacher.pt", weights_only=True)
    assert saved["phase"] == 2 and "head.weight" in saved["model"]

    # the wandb key of the environment is in no file of the run: logs, config, results, checkpoints, wandb
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert len(files) > 20 and not [f for f in files if SECRET_KEY.encode() in f.read_bytes()]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_finetune_two_workers_zero2(tmp_path, tiny_scenario):
    """Guards against the baseline path: student deployed, no consolidation, teacher == student."""
    results, _ = _train(tmp_path, tiny_scenario, "ft", ["method.name=finetune", "dist.zero_stage=2"])
    _check_results(results, 2)
    assert results["num_consolidations"] == 0
    for p in results["phases"]:
        assert p["teacher"] == p["student"]
        assert p["teacher_fingerprint"] == p["student_fingerprint"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dbd_one_worker_zero0(tmp_path, tiny_scenario):
    """Guards against the default stage 0 and a one-rank group breaking (collectives of one rank)."""
    results, _ = _train(tmp_path, tiny_scenario, "one", ["dist.zero_stage=0", "dist.num_workers=1"])
    _check_results(results, 2)
    assert results["world_size"] == 1 and results["zero_stage"] == 0
    assert [p["num_consolidations"] for p in results["phases"]] == [0, 3, 3]


# a killed run checkpoints every epoch, so that it can continue from inside a phase
KILLED = [*ZERO1, "checkpoint.every_epochs=1"]
KILL_AFTER = "phase01-epoch0002"


class _Killer:
    """Kills rank 1's worker process with SIGKILL once checkpoint KILL_AFTER of run `run_dir` is on storage,
    that is in the middle of phase 1 (4 epochs), as a lost node would."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.killed_pid: int | None = None
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> "_Killer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        log, checkpoint = self.run_dir / "logs" / "rank1.log", self.run_dir / "checkpoints" / self.run_dir.name
        while not self._stop.wait(0.01):
            if not (checkpoint / KILL_AFTER).is_dir():
                continue
            pid = re.search(r"worker pid (\d+) is rank 1", log.read_text())
            self.killed_pid = int(pid.group(1))
            os.kill(self.killed_pid, signal.SIGKILL)
            return


def _check_continued_mid_phase(run_dir: Path, reference: dict, killer: _Killer, earliest: int = 1) -> dict:
    """The run lost a worker inside phase 1, went on from a checkpoint inside that phase (at or after epoch
    `earliest`) and ended with bitwise the same teacher and student (fingerprints) and the same metrics as
    the uninterrupted run."""
    assert killer.killed_pid is not None, "the worker was never killed"
    results = json.loads((run_dir / "results.json").read_text())
    resumed = re.findall(
        r"resumed from \S+: phase (\d+) after epoch (\d+)", (run_dir / "logs" / "rank0.log").read_text()
    )
    assert len(resumed) == 1 and resumed[0][0] == "1" and earliest <= int(resumed[0][1]) < 4, resumed
    assert results["phases"] == reference["phases"]
    assert results["num_consolidations"] == reference["num_consolidations"]
    # metrics.jsonl holds each step's record once: the restarted run dropped what it recomputes
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
    return results


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_worker_recovers_by_itself(tmp_path, tiny_scenario, zero1_run):
    """Guards against a lost worker ending the run although dist.max_failures allows a restart, and
    against a restart that loses state (teacher, optimizer, schedule, RNG, data position)."""
    reference, _ = zero1_run
    run_dir = tmp_path / "runs" / "recover"
    with _Killer(run_dir) as killer:
        _train(tmp_path, tiny_scenario, "recover", [*KILLED, "dist.max_failures=1"])
    _check_continued_mid_phase(run_dir, reference, killer)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_failed_run_resumes_with_resume_flag(tmp_path, tiny_scenario, zero1_run):
    """Guards against `iil-dist train --resume RUN_DIR` restarting from scratch or from a phase boundary,
    or ending anywhere else than the uninterrupted run."""
    reference, _ = zero1_run
    run_dir = tmp_path / "runs" / "cut"
    overrides = _overrides(tmp_path, tiny_scenario, "cut", [*KILLED, "dist.max_failures=0"])
    with _Killer(run_dir) as killer, pytest.raises(Exception, match="(?i)fail|died|error"):
        cli.main(["train", str(REPO / "configs" / "digits.yaml"), *overrides])
    assert not (run_dir / "results.json").exists()
    # the newest checkpoint Ray registered is damaged afterwards (a torn copy, a disk fault): the resume
    # names it and goes on from the one before it
    experiment = run_dir / "checkpoints" / "cut"
    snapshot = json.loads((experiment / "checkpoint_manager_snapshot.json").read_text())
    newest = experiment / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    (newest / "teacher.pt").write_bytes((newest / "teacher.pt").read_bytes()[:100])
    assert cli.main(["train", "--resume", str(run_dir)]) == 0
    _check_continued_mid_phase(run_dir, reference, killer, earliest=0)  # the one before may end phase 0
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"checkpoint {newest} is incomplete: teacher.pt (rank 0) is missing or torn" in log
    assert "resuming from the newest complete checkpoint before it" in log


class _FaultKiller:
    """Kills, with SIGKILL, each rank that stops at a fault point (iil_dist.engine.faults) of this run."""

    def __init__(self, fault_dir: Path) -> None:
        self.fault_dir = fault_dir
        self.killed: list[str] = []
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._stop = threading.Event()

    def __enter__(self) -> "_FaultKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for marker in sorted(self.fault_dir.iterdir()):
                pid = marker.read_text()
                if marker.name not in self.killed and pid:
                    os.kill(int(pid), signal.SIGKILL)
                    self.killed.append(marker.name)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_killed_during_consolidation_and_evaluation_recovers(tmp_path, tiny_scenario, zero1_run, monkeypatch):
    """Guards against a restart after a node lost in the middle of a KC-EMA consolidation (rank 1: the
    teacher half updated in memory), of a checkpoint (rank 1, after rank 0 stored its part) or of an
    evaluation (rank 0, the rank that writes results and tracks) ending elsewhere than the uninterrupted
    run, resuming from the half-written checkpoint, or not recovering at all."""
    reference, _ = zero1_run
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    monkeypatch.setenv("IIL_DIST_FAULT_POINTS", "consolidate@1.3:1,checkpoint@phase02-epoch0002:1,evaluate@2:0")
    monkeypatch.setenv("IIL_DIST_FAULT_DIR", str(fault_dir))
    with _FaultKiller(fault_dir) as killer:
        results, run_dir = _train(tmp_path, tiny_scenario, "faults", [*KILLED, "dist.max_failures=3"])
    assert killer.killed == ["consolidate@1.3-rank1", "checkpoint@phase02-epoch0002-rank1", "evaluate@2-rank0"]
    resumed = re.findall(
        r"resumed from \S+: phase (\d+) after epoch (\d+)", (run_dir / "logs" / "rank0.log").read_text()
    )
    # the consolidation of epoch 3 restarts after epoch 2's checkpoint; the checkpoint of phase 2's epoch 2,
    # half written (rank 0's part stored, rank 1's not), was never registered: the restart goes back to
    # epoch 1's; phase 2's evaluation restarts after epoch 3's
    assert resumed == [("1", "2"), ("2", "1"), ("2", "3")]
    assert results["phases"] == reference["phases"]
    assert results["num_consolidations"] == reference["num_consolidations"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)
