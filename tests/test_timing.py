"""Step timing (tracking.step_timing) on the real engine, two gloo ranks: every section of a DBD step is
timed, and the sections add up to the phase's training time."""

import json
from pathlib import Path

import pytest
from helpers import REPO_CONFIG, SHORT, finish_rank, init_rank, spawn


def _worker(rank: int, world: int, port: int, scenario: str, out: str) -> None:
    from iil_dist.config import load
    from iil_dist.engine.trainer import PhaseRunner

    init_rank(rank, world, port)
    cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", "tracking.step_timing=true"])
    runner = PhaseRunner(cfg, Path(out))
    results = runner.run()
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results))
    runner.teacher.destroy()
    finish_rank()


@pytest.mark.timeout(300)
def test_step_sections_add_up_to_the_phase_time(tmp_path: Path, tiny_scenario: Path) -> None:
    """Guards against a breakdown that misses a section (the sections would not add up to the phase's
    time), charges the teacher's forwards to the student or counts steps wrongly."""
    spawn(_worker, 2, str(tiny_scenario), str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    timing = results["timing"]
    assert [t["phase"] for t in timing] == [0, 1, 2]
    steps = [p["global_step"] for p in results["phases"]]
    for t, done, before in zip(timing, steps, [0, *steps], strict=False):
        sections = set(t["step_ms"])
        assert {"data_epoch_start", "data", "student_forward", "backward", "optimizer", "logging"} <= sections
        assert ("teacher_forward" in sections) == (t["phase"] > 0)
        assert ("consolidation" in sections) == (t["phase"] > 0)  # KC-EMA from epoch 2 (SHORT)
        assert all(v > 0 for v in t["step_ms"].values())
        accounted = sum(t["step_ms"].values()) * (done - before) / 1000
        # the marks cover the whole loop but the set-up of each epoch's reader
        assert 0.7 * t["train_s"] <= accounted <= t["train_s"], (t, accounted)
        assert t["img_per_s"] > 0
