"""Atomic state files: a writer killed with SIGKILL at random moments while rewriting results.json and the
deployed teacher.pt always leaves the previous complete version (or the new one) loadable, never a torn mix."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

WRITER = """
import sys, torch
from pathlib import Path
from iil_dist.engine.checkpoint import save_deployed
from iil_dist.engine.io import atomic_write_json

out = Path(sys.argv[1])
version = int(sys.argv[2])
while True:
    version += 1
    # large enough (about 8 MB and 2 MB) that a kill often lands inside a write
    save_deployed(out / "teacher.pt", version, {"w": torch.full((2_000_000,), float(version))})
    atomic_write_json(out / "results.json", {"version": version, "rows": [version] * 200_000})
    atomic_write_json(out / "version", version)
"""


def _check(out: Path) -> int:
    """The files load completely and each holds one version throughout; returns the teacher's version."""
    results = json.loads((out / "results.json").read_text())
    assert set(results["rows"]) == {results["version"]}
    teacher = torch.load(out / "teacher.pt", weights_only=True)
    values = teacher["model"]["w"].unique().tolist()
    assert values == [float(teacher["phase"])]
    # results.json is written after teacher.pt: at most one version behind it, never ahead
    assert teacher["phase"] - 1 <= results["version"] <= teacher["phase"]
    return teacher["phase"]


def test_writer_killed_mid_write_leaves_loadable_files(tmp_path: Path) -> None:
    """Guards against a crash while saving results or the deployed model corrupting the last good copy."""
    rng = np.random.default_rng(0)
    version, kills = 0, 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(version)])
        # wait until this writer has finished at least one version, then kill it at a random moment
        deadline = time.monotonic() + 60
        while json.loads((tmp_path / "version").read_text() if (tmp_path / "version").exists() else "0") <= version:
            assert time.monotonic() < deadline and proc.poll() is None, "the writer made no progress"
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.3)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        version = _check(tmp_path)
    assert kills == 8 and version >= 8
    # a killed write leaves at most its own temporary file, never a file under a real name
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} == {
        "teacher.pt",
        "results.json",
        "version",
    }
