"""Numerical faults on the real engine (two gloo ranks, real DeepSpeed, real shards): a non-finite loss term
on one rank stops every rank with a message naming phase, step and term, or, by config, is skipped on every
rank and counted; a collapsed model is flagged."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO_CONFIG, SHORT, finish_rank, init_rank, spawn

from iil_dist.engine.trainer import near_chance

BAD_STEP = 25  # a global step of phase 1 (phase 0 of the short run has 22 steps on 2 ranks)


def _worker(rank: int, world: int, port: int, scenario: str, out: str, mode: str) -> None:
    from iil_dist.config import load
    from iil_dist.engine import trainer

    init_rank(rank, world, port)
    clean = trainer.dbd_losses

    def faulty(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # the fault: rank 1's distillation term turns to nan at one step, as an overflow would
        losses = clean(*args, **kwargs)
        runner = faulty.runner
        if rank == 1 and runner.state.global_step + 1 == BAD_STEP:
            if mode == "grad":
                # every loss term stays finite, but the gradient does not: d sqrt(u)/du is inf at u = 0
                weight = next(args[0].module.parameters())
                losses["loss"] = losses["loss"] + 0.0 * torch.sqrt(0.0 * weight.sum())
            else:
                losses["dis"] = losses["dis"] * math.nan
                losses["loss"] = losses["loss"] + losses["dis"]
        return losses

    trainer.dbd_losses = faulty
    on_nonfinite = "stop" if mode == "grad" else mode
    cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", f"optim.on_nonfinite={on_nonfinite}"])
    runner = faulty.runner = trainer.PhaseRunner(cfg, Path(out) / mode)
    try:
        results = runner.run()
    except trainer.NonFiniteError as err:
        (Path(out) / f"error-rank{rank}.txt").write_text(str(err))
    else:
        if rank == 0:
            (Path(out) / "results.json").write_text(json.dumps(results))
    finite = all(bool(torch.isfinite(p).all()) for p in runner.teacher.module.parameters())
    (Path(out) / f"finite-rank{rank}.txt").write_text(str(finite))
    runner.teacher.destroy()
    finish_rank()


@pytest.mark.timeout(300)
def test_nonfinite_loss_on_one_rank_stops_every_rank_naming_it(tmp_path: Path, tiny_scenario: Path) -> None:
    """Guards against a nan loss going into the weights, a message that does not say where, or one rank
    stopping while the other waits in a collective (the test would time out)."""
    spawn(_worker, 2, str(tiny_scenario), str(tmp_path), "stop")
    messages = [(tmp_path / f"error-rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith(
        f"phase 1 epoch 1 step {BAD_STEP}: non-finite loss term dis (on 1 rank), loss (on 1 rank)"
    )
    assert "optim.on_nonfinite=skip" in messages[0]
    assert [(tmp_path / f"finite-rank{r}.txt").read_text() for r in range(2)] == ["True", "True"]


@pytest.mark.timeout(300)
def test_nonfinite_loss_skipped_on_every_rank_and_counted(tmp_path: Path, tiny_scenario: Path) -> None:
    """Guards against a skipped step that is not counted, taken on some ranks only (the ranks' weights would
    differ: the engine's fingerprint check would stop the run), or that spoils the weights."""
    spawn(_worker, 2, str(tiny_scenario), str(tmp_path), "skip")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [p["skipped_steps"] for p in results["phases"]] == [0, 1, 0]
    assert [p["collapsed"] for p in results["phases"]] == [False, False, False]
    assert [(tmp_path / f"finite-rank{r}.txt").read_text() for r in range(2)] == ["True", "True"]


@pytest.mark.timeout(300)
def test_nonfinite_gradient_with_finite_losses_stops_every_rank(tmp_path: Path, tiny_scenario: Path) -> None:
    """Guards against a non-finite gradient (finite loss terms, so the loss check passes) going unnoticed into
    the weights the run goes on with: every rank stops at that step, saying that the weights are spoilt."""
    spawn(_worker, 2, str(tiny_scenario), str(tmp_path), "grad")
    messages = [(tmp_path / f"error-rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"phase 1 epoch 1 step {BAD_STEP}: the gradient norm is nan although every loss")
    assert "Resume from the last checkpoint" in messages[0]
    assert not (tmp_path / "results.json").exists()


def test_collapse_is_chance_level():
    """Guards against the collapse flag firing on a weak but working model or missing a model at chance."""
    assert near_chance(10.0, 10) and near_chance(14.9, 10) and not near_chance(15.0, 10)
    assert near_chance(0.1, 1000) and not near_chance(5.0, 1000)
