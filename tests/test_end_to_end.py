"""End to end: `iil-dist train` on a real local Ray cluster with 2 DeepSpeed workers (gloo, fp32)."""

import json
import re
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


def _train(tmp_path: Path, scenario: Path, name: str, extra: list[str]) -> tuple[dict, Path]:
    overrides = [*TINY, f"data.root={scenario}", f"run_root={tmp_path / 'runs'}", f"name={name}", *extra]
    assert cli.main(["train", str(REPO / "configs" / "digits.yaml"), *overrides]) == 0
    run_dir = tmp_path / "runs" / name
    return json.loads((run_dir / "results.json").read_text()), run_dir


def _check_results(results: dict, num_phases: int) -> None:
    assert isinstance(results["method"], str) and results["num_phases"] == num_phases
    assert [p["phase"] for p in results["phases"]] == list(range(num_phases + 1))
    for p in results["phases"]:
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
def test_dbd_two_workers_zero1(tmp_path, tiny_scenario):
    """Guards against a broken spine: Ray + DeepSpeed + shards + DBD/KC-EMA + eval + results + wandb."""
    results, run_dir = _train(tmp_path, tiny_scenario, "dbd", ["dist.zero_stage=1", "dist.num_workers=2"])
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
