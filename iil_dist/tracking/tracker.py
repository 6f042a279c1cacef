"""Run tracking: wandb (rank 0 only), `metrics.jsonl` and the console progress line.

Non-zero ranks get a tracker that does nothing, so the training loop calls it unconditionally.
Keys are grouped by slash: `train/`, `ema/`, `eval/`, `time/`, `data/`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
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

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        total_steps: int,
        revision: str = "unknown",
        *,
        start_step: int = 0,
        wandb_id: str | None = None,
    ) -> None:
        """A resumed run passes the step of its checkpoint and its wandb run id: records after that step
        (written before the interruption, and about to be written again) are dropped from metrics.jsonl,
        and the same wandb run continues."""
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.start_step = start_step
        self.mode = resolve_wandb_mode(cfg.tracking.wandb_mode)
        self.finish_timeout_s = cfg.tracking.finish_timeout_s
        run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = run_dir / "metrics.jsonl"
        if jsonl.exists():  # a resumed or restarted run
            _truncate_after(jsonl, start_step)
        self._jsonl = open(jsonl, "a", buffering=1)  # noqa: SIM115
        self._start = time.monotonic()
        self._run = None
        self.run_id = wandb_id
        if self.mode != "disabled":
            import wandb

            def start(mode: str) -> Any:
                return wandb.init(
                    project=cfg.tracking.project,
                    group=cfg.tracking.group or cfg.name,
                    name=cfg.name,
                    dir=str(run_dir),
                    mode=mode,
                    config={**to_dict(cfg), "code_revision": revision},
                    job_type="train",
                    id=wandb_id,
                    resume="allow" if wandb_id else None,
                    settings=wandb.Settings(init_timeout=cfg.tracking.init_timeout_s),
                )

            try:
                self._run = start(self.mode)
            except Exception as err:  # wandb's errors for a server it cannot reach or that refuses the run
                if self.mode != "online":
                    raise
                # training goes on: the run is kept offline, to be uploaded later
                log.warning(
                    "wandb: no online run (%s: %s); logging offline to %s instead, upload it later with `wandb sync`",
                    type(err).__name__, str(err).splitlines()[0][:200], run_dir / "wandb",
                )  # fmt: skip
                self.mode = "offline"
                self._run = start(self.mode)
            self.run_id = self._run.id
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
        eta = elapsed / max(step - self.start_step, 1) * max(self.total_steps - step, 0)
        log.info("%s | step %d/%d | eta %s", text, step, self.total_steps, _hms(eta))

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value

    def close(self) -> None:
        """Closes metrics.jsonl and finishes the wandb run, waiting at most tracking.finish_timeout_s: wandb
        retries a lost server without end, and the job must not wait on it after training is done."""
        self._jsonl.close()
        run, self._run = self._run, None
        if run is None:
            return
        finished = threading.Event()

        def finish() -> None:
            try:
                run.finish()
            finally:
                finished.set()

        threading.Thread(target=finish, name="wandb-finish", daemon=True).start()
        if not finished.wait(self.finish_timeout_s):
            log.warning(
                "wandb: the run did not finish uploading within %.0f s (tracking.finish_timeout_s); its files "
                "stay in %s, upload them later with `wandb sync`",
                self.finish_timeout_s, self.run_dir / "wandb",
            )  # fmt: skip


class NullTracker:
    """The tracker of ranks other than 0: accepts every call and does nothing."""

    run_id: str | None = None

    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def progress(self, step: int, text: str) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the records of `path` up to `step`, rewriting the file atomically."""
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
