"""Studies: the confidence interval, the aggregation over orders, and a real two-variant, two-order study on
a local Ray cluster that reuses its finished runs when run again."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from iil_dist import cli
from iil_dist.config import ConfigError, from_dict
from iil_dist.report.study import summarize, t_interval

REPO = Path(__file__).resolve().parents[1]


def test_t_interval_matches_the_t_table():
    """Guards against a normal-approximation or population-sd interval: with n = 5 the 97.5% t quantile
    (4 degrees of freedom) is 2.7764, and the sample sd divides by n - 1."""
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert math.isnan(t_interval([4.0])[1])
    with pytest.raises(ValueError):
        t_interval([])


def test_summarize_groups_by_variant_and_phase():
    """Guards against aggregating across variants or phases, or against the wrong model's numbers."""

    def run(variant, order, pp):
        phase = {m: {"test_acc": 50.0 + pp, "base_acc": 90.0, "pp": pp if m == "teacher" else 0.0, "f": 1.0}
                 for m in ("teacher", "student")}  # fmt: skip
        zero = {m: {"test_acc": 50.0, "base_acc": 90.0, "pp": 0.0, "f": 0.0} for m in ("teacher", "student")}
        return {"variant": variant, "num_phases": 1, "order": order, "phases": [zero, phase]}

    rows = summarize([run("a", 0, 2.0), run("a", 1, 4.0), run("b", 0, -1.0)])
    final = {r["variant"]: r for r in rows if r["phase"] == 1}
    assert final["a"]["n"] == 2 and final["a"]["teacher/pp"]["mean"] == 3.0 and final["a"]["student/pp"]["mean"] == 0
    assert final["a"]["teacher/pp"]["ci"] == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2), rel=1e-6)
    assert final["b"]["n"] == 1 and final["b"]["teacher/pp"]["values"] == [-1.0]


TINY = ["data.num_phases=1", "optim.base_epochs=2", "optim.epochs_per_phase=2", "method.freeze_epochs=1",
        "dist.num_workers=1", "tracking.log_every=5", "tracking.print_every=10",
        "tracking.wandb_mode=disabled"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_study_runs_every_variant_and_order_and_reuses_finished_runs(tmp_path, capsys):
    """Guards against a study that skips a (variant, order) pair, aggregates the wrong runs, or reruns
    finished experiments when it is started again."""
    args = ["study", str(REPO / "configs" / "digits.yaml"), *TINY, f"data.scenarios_root={tmp_path / 'data'}",
            f"run_root={tmp_path / 'runs'}", "--name", "s", "--variants", "dbd,finetune",
            "--orders", "0-1"]  # fmt: skip
    assert cli.main(args) == 0
    study = json.loads((tmp_path / "runs" / "s" / "study.json").read_text())
    assert sorted((r["variant"], r["order"]) for r in study["runs"]) == [
        ("dbd", 0), ("dbd", 1), ("finetune", 0), ("finetune", 1)
    ]  # fmt: skip
    for run in study["runs"]:
        results = json.loads((Path(run["run_dir"]) / "results.json").read_text())
        assert results["phases"] == run["phases"] and results["config"]["data"]["order_seed"] == run["order"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "digits-rotation-t1-split0-order0", "digits-rotation-t1-split0-order1"
    ]  # fmt: skip
    final = {r["variant"]: r for r in study["summary"] if r["phase"] == 1}
    dbd = [r["phases"][1]["teacher"]["pp"] for r in study["runs"] if r["variant"] == "dbd"]
    assert final["dbd"]["teacher/pp"]["mean"] == pytest.approx(sum(dbd) / 2)
    assert "PP_T and F_T" in capsys.readouterr().out

    # started again (overrides after the options this time, which must mean the same), every run is reused:
    # no run directory is moved aside, no new results written
    stamps = {r["run_dir"]: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for r in study["runs"]}
    options = args.index("--name")
    assert cli.main([*args[:2], *args[options:], *args[2:options]]) == 0
    assert all((Path(d) / "results.json").stat().st_mtime_ns == t for d, t in stamps.items())
    assert sorted(p.name for p in (tmp_path / "runs" / "s").iterdir()) == sorted(
        ["study.json", *(Path(d).name for d in stamps)]
    )

    # the report of the study: a table of the final phase, both plots as PNGs, the images logged to wandb
    assert cli.main(["report", str(tmp_path / "runs" / "s"), "--wandb-mode", "offline"]) == 0
    report = (tmp_path / "runs" / "s" / "report.md").read_text()
    assert "| dbd | 1 | 2 |" in report and "| finetune | 1 | 2 |" in report and "![per phase](pp_f.png)" in report
    for png in ("pp_f.png", "final.png"):
        with Image.open(tmp_path / "runs" / "s" / png) as image:
            assert image.format == "PNG" and image.size[0] >= 800
    assert list((tmp_path / "runs" / "s" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


def test_cli_rejects_stray_arguments(capsys):
    """Guards against the leftover-arguments rule (overrides may follow the options) swallowing a mistyped
    option or a word that is no override, or handing overrides to a command that takes none."""
    for argv in (["study", "configs/digits.yaml", "--name", "x", "--bogus"],
                 ["study", "configs/digits.yaml", "--name", "x", "digits"], ["fields", "data.drift=none"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


def test_sweep_expands_one_field_at_a_time():
    """Guards against a sweep that varies several fields at once, drops the unswept variant, or lets a bad
    field through to the runs."""
    from iil_dist.report.study import expand_variants, run_study

    expanded = expand_variants(["dbd", "finetune"], ["method.sigma=0.5,2", "method.ema_alpha=0.8"])
    assert expanded == {
        "dbd": ["method.name=dbd"],
        "finetune": ["method.name=finetune"],
        "dbd+method.sigma=0.5": ["method.name=dbd", "method.sigma=0.5"],
        "dbd+method.sigma=2": ["method.name=dbd", "method.sigma=2"],
        "finetune+method.sigma=0.5": ["method.name=finetune", "method.sigma=0.5"],
        "finetune+method.sigma=2": ["method.name=finetune", "method.sigma=2"],
        "dbd+method.ema_alpha=0.8": ["method.name=dbd", "method.ema_alpha=0.8"],
        "finetune+method.ema_alpha=0.8": ["method.name=finetune", "method.ema_alpha=0.8"],
    }
    with pytest.raises(ConfigError, match="FIELD=V1,V2"):
        expand_variants(["dbd"], ["method.sigma"])
    # checked before Ray starts or a scenario is written
    cfg = from_dict({})
    with pytest.raises(ConfigError, match="method.sigmaa"):
        run_study(cfg, "s", ["dbd"], [0], sweep=["method.sigmaa=1"])
    with pytest.raises(ConfigError, match="method.ema_alpha"):
        run_study(cfg, "s", ["dbd"], [0], sweep=["method.ema_alpha=1.5"])
