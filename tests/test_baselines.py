"""The baselines on the same engine (one gloo rank, real DeepSpeed, real shards): LwF, the mean teacher and
joint training, checked by what distinguishes each from fine-tuning."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO_CONFIG, SHORT, finish_rank, init_rank, spawn

from iil_dist.config import from_dict, load
from iil_dist.data.reader import num_train_batches
from iil_dist.data.shards import read_manifest
from iil_dist.method.dbd import lwf_losses

METHODS = ("lwf", "mean_teacher", "joint")


def test_lwf_loss_is_cross_entropy_plus_tempered_kl():
    """Guards against an LwF objective that drops a term, swaps the KL's direction or forgets tau^2."""
    cfg = from_dict({}, ["method.name=lwf", "method.lwf_lambda=0.5", "method.lwf_tau=3"]).method
    torch.manual_seed(0)
    student, old = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    losses = lwf_losses(student, old, x, y, cfg)
    p_old = F.softmax(old(x) / 3, 1)
    kl = (p_old * (p_old.log() - F.log_softmax(student(x) / 3, 1))).sum(1).mean()
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-6)
    assert losses["lwf"].item() == pytest.approx(9 * kl.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item() + 0.5 * losses["lwf"].item(), rel=1e-6)
    losses["loss"].backward()
    assert old.weight.grad is None  # the phase-start model is frozen


def _worker(rank: int, world: int, port: int, scenario: str, runs: str) -> None:
    from iil_dist.engine.trainer import PhaseRunner

    init_rank(rank, world, port)
    for method in METHODS:
        run_dir = Path(runs) / method
        cfg = load(REPO_CONFIG, [*SHORT, f"data.root={scenario}", f"method.name={method}", "method.mt_alpha=0.9"])
        runner = PhaseRunner(cfg, run_dir)
        results = runner.run()
        # the step count the progress line's ETA is based on is the count the run took (joint's phases grow)
        assert runner.total_steps == runner.state.global_step, (method, runner.total_steps, runner.state.global_step)
        if rank == 0:
            (run_dir / "results.json").write_text(json.dumps(results))
        runner.teacher.destroy()
    finish_rank()


@pytest.mark.timeout(400)
def test_baselines_train_and_deploy_what_they_should(tmp_path, tiny_scenario):
    """Guards against a baseline silently running as fine-tuning: LwF must add its distillation term and
    deploy the student; the mean teacher must update its teacher after every step and deploy it; joint
    training must train phase t on D(0) + ... + D(t) and deploy the student."""
    spawn(_worker, 1, str(tiny_scenario), str(tmp_path))
    manifest = read_manifest(tiny_scenario)
    sizes = {name: entry["num_samples"] for name, entry in manifest["splits"].items()}
    results = {m: json.loads((tmp_path / m / "results.json").read_text()) for m in METHODS}

    lwf = results["lwf"]
    assert all(p["teacher_fingerprint"] == p["student_fingerprint"] for p in lwf["phases"])
    records = [json.loads(line) for line in (tmp_path / "lwf" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/lwf" in r and r["train/lwf"] > 0 for r in records if r.get("phase", 0) > 0)

    steps = num_train_batches(sizes["phase-01"], 1, 32)
    mean_teacher = results["mean_teacher"]
    for p in mean_teacher["phases"][1:]:
        assert p["num_consolidations"] == 3 * steps  # 3 epochs, one update per step
        assert p["teacher_fingerprint"] != p["student_fingerprint"]

    joint = results["joint"]
    base_steps = 2 * num_train_batches(sizes["base"], 1, 32)
    step_at_end = [p["global_step"] for p in joint["phases"]]
    for t in (1, 2):
        seen = sizes["base"] + sum(sizes[f"phase-{k:02d}"] for k in range(1, t + 1))
        assert step_at_end[t] - step_at_end[t - 1] == 3 * num_train_batches(seen, 1, 32)
    assert step_at_end[0] == base_steps
    assert all(p["teacher_fingerprint"] == p["student_fingerprint"] for p in joint["phases"])
