"""Ray Train orchestration: starts the workers, hands them the config, collects results.

Each Ray Train worker is one DeepSpeed rank; Ray sets up the torch process group (gloo on CPU,
nccl on GPU) and DeepSpeed reuses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from iil_dist.config import Config, from_dict, to_dict
from iil_dist.tracking.logs import LogFollower, code_revision

log = logging.getLogger(__name__)

# Variables every worker needs; set before DeepSpeed is imported there.
_WORKER_ENV = {"DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def worker_entry(loop_config: dict[str, Any]) -> None:
    """The per-worker function run by `TorchTrainer` on every rank."""
    cfg = from_dict(loop_config["config"])
    if not cfg.dist.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train
    import torch

    from iil_dist.engine.dist import rank
    from iil_dist.engine.trainer import PhaseRunner
    from iil_dist.tracking.logs import setup_logging

    torch.set_num_threads(cfg.dist.torch_threads)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.dist.use_gpu else "gloo")
    run_dir = Path(loop_config["run_dir"])
    setup_logging(rank(), run_dir / "logs")

    def report(metrics: dict[str, Any]) -> None:
        # every rank reports the same number of times (Ray Train requires it)
        ray.train.report(metrics)

    PhaseRunner(cfg, run_dir, report, revision=loop_config.get("revision", "unknown")).run()


def _prepare_run_dir(run_dir: Path) -> None:
    """Moves a previous run with the same name aside, so nothing of it is lost or mixed in."""
    if run_dir.exists() and any(run_dir.iterdir()):
        # TODO(#3): resume an unfinished run in place instead of moving it aside.
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("run directory %s exists; moving it to %s", run_dir, aside)
        shutil.move(str(run_dir), str(aside))
    run_dir.mkdir(parents=True, exist_ok=True)


def launch(cfg: Config) -> dict[str, Any]:
    """Runs the experiment on a Ray cluster (RAY_ADDRESS, or a local one started here)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # workers may run elsewhere: hand them absolute paths
    cfg = from_dict(to_dict(cfg) | {"run_root": str(Path(cfg.run_root).resolve())})
    cfg.data.root = str(cfg.data.scenario_dir.resolve())
    run_dir = cfg.run_dir
    _prepare_run_dir(run_dir)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    revision = code_revision()
    log.info("code revision %s; run directory %s", revision, run_dir)

    env = dict(_WORKER_ENV)
    if cfg.dist.use_gpu:
        env.pop("DS_ACCELERATOR")
    env["WANDB_MODE"] = os.environ.get("WANDB_MODE", cfg.tracking.wandb_mode)
    started_here = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        started_here = address is None
        # on a local cluster the console is rank 0's log file, followed below; Ray's forwarding of
        # every worker's output (and Ray Train's own messages) stays in /tmp/ray/session_latest/logs
        ray.init(
            address=address, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=not started_here
        )
        log.info(
            "ray: %s cluster, %s",
            "local" if started_here else f"cluster at {address}",
            ray.cluster_resources(),
        )
    try:
        trainer = TorchTrainer(
            train_loop_per_worker=worker_entry,
            train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "revision": revision},
            scaling_config=ScalingConfig(
                num_workers=cfg.dist.num_workers,
                use_gpu=cfg.dist.use_gpu,
                resources_per_worker={"CPU": cfg.dist.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=cfg.name, storage_path=str(run_dir / "ray"), failure_config=FailureConfig(max_failures=0)
            ),
        )
        console = LogFollower(run_dir / "logs" / "rank0.log") if started_here else contextlib.nullcontext()
        with console:
            trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    results_path = run_dir / "results.json"
    if not results_path.exists():
        raise RuntimeError(f"training finished without writing {results_path}; see {run_dir / 'logs'}")
    return json.loads(results_path.read_text())
