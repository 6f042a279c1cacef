"""Shared fixtures: environment for CPU DeepSpeed and offline wandb, and a tiny prepared scenario."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


def _two_phase_digits(root: Path, samples_per_shard: int) -> Path:
    from iil_dist.data.shards import write_scenario

    write_scenario(
        root, source="digits", num_phases=2, base_fraction=0.5, test_fraction=0.25, split_seed=0, order_seed=0,
        drift="rotation", rotation_min_deg=20.0, rotation_max_deg=60.0, image_size=16,
        samples_per_shard=samples_per_shard,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def tiny_scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with rotation drift in 2 phases of 337 samples, in shards of 150 (so 3 shards per phase,
    an odd number for 2 ranks), written once per test session."""
    return _two_phase_digits(tmp_path_factory.mktemp("scenario") / "digits-tiny", samples_per_shard=150)


@pytest.fixture(scope="session")
def coarse_scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same scenario in shards of 400 samples: each phase is one shard, fewer than the ranks."""
    return _two_phase_digits(tmp_path_factory.mktemp("scenario") / "digits-coarse", samples_per_shard=400)
