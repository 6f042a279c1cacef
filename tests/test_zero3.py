"""The teacher under every ZeRO stage on 2 gloo ranks: exact consolidation, no communication, and the
same phase result at stages 0-3; plus uneven shards over ranks."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO_CONFIG, SHORT, count_collectives, finish_rank, init_rank, spawn

from iil_dist.config import load
from iil_dist.engine.deepspeed_config import deepspeed_config
from iil_dist.engine.dist import average_buffers_
from iil_dist.engine.teacher import Teacher
from iil_dist.engine.trainer import PhaseRunner
from iil_dist.engine.zero import full_state_dict
from iil_dist.models import build_model
from iil_dist.tracking.logs import setup_logging

ALPHA = 0.7
NUM_UPDATES = 3


def _consolidation_worker(rank: int, world: int, port: int, out: str) -> None:
    init_rank(rank, world, port)
    import deepspeed

    results = {}
    for stage in (0, 1, 2, 3):
        cfg = load(REPO_CONFIG, [f"dist.zero_stage={stage}", "optim.batch_size=8"])
        torch.manual_seed(0)
        teacher = Teacher(build_model("small_cnn", num_classes=10, in_channels=1), zero_stage=stage, micro_batch=8)
        torch.manual_seed(1)  # the student starts elsewhere, so that the average is not trivial
        model = build_model("small_cnn", num_classes=10, in_channels=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
        reference = {k: v.double() for k, v in teacher.full_state_dict().items()}
        calls, seconds = [], []
        for k in range(NUM_UPDATES):
            torch.manual_seed(100 + 10 * k + rank)  # every rank its own batch
            engine.train()
            x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
            average_buffers_(engine.module)
            with count_collectives() as called:
                start = time.perf_counter()
                teacher.consolidate_(engine, ALPHA)
                seconds.append(time.perf_counter() - start)
            calls += called
            # the reference: a plain float64 EMA of the whole student, as one process would compute it
            student = full_state_dict(engine.module)
            reference = {
                n: ALPHA * reference[n] + (1 - ALPHA) * student[n].double() if student[n].is_floating_point()
                else student[n].clone()
                for n in reference
            }  # fmt: skip
        with count_collectives() as gather_calls:
            got = teacher.full_state_dict()
        diff = max((got[n].double() - reference[n]).abs().max().item() for n in got if got[n].is_floating_point())
        ints_equal = all(torch.equal(got[n], reference[n]) for n in got if not got[n].is_floating_point())
        results[stage] = {
            "max_abs_diff": diff, "ints_equal": ints_equal, "calls": calls, "gather_calls": len(gather_calls),
            "bytes": teacher.local_bytes(), "seconds": seconds, "partitioned": teacher.partitioned,
        }  # fmt: skip
        engine.destroy()
        teacher.destroy()
    Path(out.format(rank=rank)).write_text(json.dumps(results))
    finish_rank()


@pytest.mark.timeout(400)
def test_consolidation_equals_plain_ema_at_every_stage_without_communication(tmp_path):
    """Guards against a teacher that drifts from the unsharded EMA (wrong slice, stale persisted
    parameters, bf16 rounding), against a consolidation that gathers parameters, and against a stage-3
    teacher that is not actually partitioned."""
    out = str(tmp_path / "rank{rank}.json")
    spawn(_consolidation_worker, 2, out)
    ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(2)]
    for stage in ("0", "1", "2", "3"):
        for r, results in enumerate(ranks):
            got = results[stage]
            assert got["max_abs_diff"] <= 1e-6, f"stage {stage} rank {r}: teacher off by {got['max_abs_diff']}"
            assert got["ints_equal"]
            assert got["calls"] == [], f"stage {stage}: consolidation communicated: {got['calls']}"
    # the counter sees collectives where there are some: gathering a stage-3 teacher
    assert ranks[0]["3"]["gather_calls"] > 0 and ranks[0]["3"]["partitioned"]
    # each rank holds about half of the stage-3 teacher's weights (plus whole BatchNorm buffers)
    for results in ranks:
        assert results["3"]["bytes"] < 0.55 * results["0"]["bytes"]


def _phase_worker(rank: int, world: int, port: int, scenario: str, runs: str, out: str) -> None:
    init_rank(rank, world, port)
    results = {}
    for stage in (0, 1, 2, 3):
        run_dir = Path(runs) / f"stage{stage}"
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(rank, run_dir / "logs")
        cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", f"dist.zero_stage={stage}"])
        runner = PhaseRunner(cfg, run_dir)
        summary = runner.run()
        teacher = runner.teacher.full_state_dict()
        results[stage] = {"steps": runner.state.global_step, "accs": [p["teacher"] for p in summary["phases"]]}
        torch.save(teacher, Path(runs) / f"teacher-stage{stage}-rank{rank}.pt")
        runner.teacher.destroy()
    Path(out.format(rank=rank)).write_text(json.dumps(results))
    finish_rank()


@pytest.mark.timeout(600)
def test_phase_gives_same_teacher_at_every_stage_over_uneven_shards(tmp_path, tiny_scenario):
    """Guards against a ZeRO stage changing what is learnt (teacher weights after a whole run of two
    DBD + KC-EMA phases) and against ranks running different step counts over 3 shards (a hang)."""
    from iil_dist.data.shards import read_manifest

    manifest = read_manifest(tiny_scenario)
    assert len(manifest["splits"]["phase-01"]["shards"]) == 3
    out = str(tmp_path / "rank{rank}.json")
    spawn(_phase_worker, 2, str(tiny_scenario), str(tmp_path / "runs"), out)
    ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(2)]
    # every rank ran the same number of steps: 2 epochs x 11 + 2 phases x 3 epochs x 6
    assert {results[s]["steps"] for results in ranks for s in results} == {2 * 11 + 2 * 3 * 6}
    reference = torch.load(tmp_path / "runs" / "teacher-stage0-rank0.pt", weights_only=True)
    for stage in (1, 2, 3):
        got = torch.load(tmp_path / "runs" / f"teacher-stage{stage}-rank0.pt", weights_only=True)
        diff = max((got[k].double() - reference[k].double()).abs().max().item() for k in reference)
        # measured: 1.8e-6 at stages 1 and 2, 6.8e-5 at stage 3 (float32 reductions in another order,
        # grown over 58 steps); accuracies agree exactly
        tolerance = 5e-4 if stage == 3 else 2e-5
        assert diff <= tolerance, f"stage {stage}: teacher differs from stage 0 by {diff}"
    for stage in ("1", "2", "3"):
        assert ranks[0][stage]["accs"] == ranks[0]["0"]["accs"]


def _many_ranks_worker(rank: int, world: int, port: int, scenario: str, runs: str, out: str) -> None:
    init_rank(rank, world, port)
    cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", "dist.zero_stage=2"])
    runner = PhaseRunner(cfg, Path(runs))
    runner.run()
    Path(out.format(rank=rank)).write_text(str(runner.state.global_step))
    finish_rank()


@pytest.mark.timeout(300)
def test_more_ranks_than_shards(tmp_path, coarse_scenario):
    """Guards against a split of one shard over 3 ranks hanging or giving ranks different step counts."""
    from iil_dist.data.shards import read_manifest

    assert len(read_manifest(coarse_scenario)["splits"]["phase-01"]["shards"]) == 1
    (tmp_path / "runs").mkdir()
    out = str(tmp_path / "rank{rank}.txt")
    spawn(_many_ranks_worker, 3, str(coarse_scenario), str(tmp_path / "runs"), out)
    steps = {int(Path(out.format(rank=r)).read_text()) for r in range(3)}
    # base: 674 // 3 = 224 samples -> 7 steps x 2 epochs; phases: 337 // 3 = 112 -> 4 steps x 3 epochs x 2
    assert steps == {7 * 2 + 4 * 3 * 2}
