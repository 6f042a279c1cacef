"""The benchmark scripts run: the GPU script on CPU at toy size (its GPU run is measured when a GPU is lent),
and it skips cleanly where no GPU is present."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), *args], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)  # fmt: skip


def test_gpu_script_measures_both_steps_and_consolidation(tmp_path: Path) -> None:
    """Guards against the GPU script breaking where it cannot be run every day: the same code on CPU."""
    out = tmp_path / "gpu.json"
    _run("--device", "cpu", "--side", "64", "--batch", "4", "--steps", "2", "--warmup", "1", "--out", str(out))
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["rows"]] == ["resnet18", "resnet50"]
    for row in report["rows"]:
        assert row["plain_img_per_s"] > 0 and row["dbd_img_per_s"] > 0 and row["consolidation_ms"] > 0
        # a DBD step runs two student and two teacher forwards: it cannot be faster than a plain step
        assert row["dbd_to_plain"] < 1
    assert report["rows"][1]["elements"] > 2 * report["rows"][0]["elements"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script measures instead")
def test_gpu_script_skips_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    _run("--out", str(out))
    assert json.loads(out.read_text()) == {"skipped": "no GPU present"}
