"""The driver's handling of an existing run directory: continue an unfinished run, refuse one with other
settings, move a finished one aside. Plain file-system logic; the Ray side is in test_end_to_end.py."""

import json

import pytest

from iil_dist.config import ConfigError, from_dict, to_dict
from iil_dist.orchestration.ray_train import _prepare_run_dir, checkpoint_root


def _unfinished_run(tmp_path, overrides=()):
    cfg = from_dict({}, [f"run_root={tmp_path}", "name=exp", *overrides])
    run_dir = cfg.run_dir
    (checkpoint_root(run_dir) / cfg.name / "phase01-epoch0002").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    return cfg, run_dir


def test_same_name_continues_an_unfinished_run(tmp_path):
    """Guards against re-running an interrupted experiment starting over (or moving its checkpoints away)
    instead of continuing from its last checkpoint; run-time fields such as the worker count may change."""
    _, run_dir = _unfinished_run(tmp_path)
    again = from_dict({}, [f"run_root={tmp_path}", "name=exp", "dist.num_workers=1"])
    assert _prepare_run_dir(run_dir, again, resume=False) is True
    assert (checkpoint_root(run_dir) / "exp" / "phase01-epoch0002").is_dir()
    assert json.loads((run_dir / "config.json").read_text())["dist"]["num_workers"] == 1


def test_unfinished_run_with_other_settings_is_refused_naming_the_fields(tmp_path):
    """Guards against silently continuing a run with a different method: its checkpoints would mix two
    experiments. The message names the differing field and how to go on."""
    _, run_dir = _unfinished_run(tmp_path)
    other = from_dict({}, [f"run_root={tmp_path}", "name=exp", "method.ema_alpha=0.8"])
    with pytest.raises(ConfigError, match=r"method\.ema_alpha.*--resume"):
        _prepare_run_dir(run_dir, other, resume=False)


def test_finished_run_is_moved_aside(tmp_path):
    """Guards against a new run mixing into, or deleting, a finished run of the same name."""
    cfg, run_dir = _unfinished_run(tmp_path)
    (run_dir / "results.json").write_text("{}")
    assert _prepare_run_dir(run_dir, cfg, resume=False) is False
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("exp.")]
    assert len(aside) == 1 and (aside[0] / "results.json").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_resume_needs_a_run_directory(tmp_path):
    """Guards against --resume on a directory that holds no run being taken as a fresh start."""
    cfg = from_dict({}, [f"run_root={tmp_path}", "name=nothing"])
    with pytest.raises(ConfigError, match="config.json"):
        _prepare_run_dir(cfg.run_dir, cfg, resume=True)


def test_more_workers_than_samples_is_refused_before_ray_starts(tmp_path, tiny_scenario):
    """Guards against a world larger than a split reaching the workers, where it fails late and per rank."""
    import ray

    from iil_dist.orchestration.ray_train import launch

    cfg = from_dict({}, [f"run_root={tmp_path}", f"data.root={tiny_scenario}", "data.num_phases=2",
                         "dist.num_workers=400"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"dist.num_workers=400: split phase-01 of .* has only 337 samples"):
        launch(cfg)
    assert not ray.is_initialized() and not cfg.run_dir.exists()
