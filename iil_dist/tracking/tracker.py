"""Run tracking: wandb (rank 0 only), `metrics.jsonl` and the console progress line.

Non-zero ranks get a tracker that does nothing, so the training loop calls it unconditionally.
Keys are grouped by slash: `train/`, `ema/`, `eval/`, `time/`, `data/`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from iil_dist.config import Config, to_dict

log = logging.getLogger(__name__)


def resolve_wandb_mode(configured: str) -> str:
    """WANDB_MODE in the environment wins over the config, so CI and users can switch it."""
    mode = os.environ.get("WANDB_MODE", configured).strip().lower()
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}: expected offline, online or disabled")
    return mode


class Tracker:
    """Rank-0 tracker writing every record to metrics.jsonl and, unless disabled, to wandb."""

    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, revision: str = "unknown") -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.mode = resolve_wandb_mode(cfg.tracking.wandb_mode)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self._start = time.monotonic()
        self._run = None
        if self.mode != "disabled":
            import wandb

            self._run = wandb.init(
                project=cfg.tracking.project,
                group=cfg.name,
                name=cfg.name,
                dir=str(run_dir),
                mode=self.mode,
                config={**to_dict(cfg), "code_revision": revision},
                job_type="train",
            )
            log.info("wandb run %s (%s) in %s", self._run.id, self.mode, run_dir / "wandb")

    def log(self, record: dict[str, Any], step: int) -> None:
        """Writes one record (flat keys) to metrics.jsonl and wandb at the global step."""
        self._jsonl.write(
            json.dumps({"step": step, "time_s": round(time.monotonic() - self._start, 3), **record}) + "\n"
        )
        if self._run is not None:
            self._run.log(record, step=step)

    def progress(self, step: int, text: str) -> None:
        """Logs one console line with the run's ETA extrapolated from the steps done so far."""
        elapsed = time.monotonic() - self._start
        eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
        log.info("%s | step %d/%d | eta %s", text, step, self.total_steps, _hms(eta))

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value

    def close(self) -> None:
        self._jsonl.close()
        if self._run is not None:
            self._run.finish()
            self._run = None


class NullTracker:
    """The tracker of ranks other than 0: accepts every call and does nothing."""

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def progress(self, step: int, text: str) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
