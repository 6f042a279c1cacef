"""Ray Train orchestration: starts the workers, hands them the config, keeps checkpoints, collects results.

Each Ray Train worker is one DeepSpeed rank; Ray sets up the torch process group (gloo on CPU,
nccl on GPU) and DeepSpeed reuses it. Checkpoints go through `ray.train.report`: Ray merges the
ranks' files into one directory under `RUN_DIR/checkpoints/NAME/`, registers it only once every
rank's upload is done, prunes old ones, and hands the newest to the workers of a restarted group
(after a lost worker, `dist.max_failures`) or of a resumed run (`iil-dist train --resume RUN_DIR`,
or the same run name again).
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

from iil_dist.config import Config, ConfigError, from_dict, load, resume_conflicts, to_dict
from iil_dist.data.shards import read_manifest
from iil_dist.engine.io import atomic_write_json
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
    import ray.train.torch
    import torch

    from iil_dist.engine.dist import rank
    from iil_dist.engine.trainer import PhaseRunner
    from iil_dist.tracking.logs import setup_logging

    torch.set_num_threads(cfg.dist.torch_threads)
    if cfg.dist.use_gpu:
        # Ray gives each worker one GPU; make it the current device before any CUDA tensor exists
        torch.cuda.set_device(ray.train.torch.get_device())
    deepspeed.init_distributed(dist_backend="nccl" if cfg.dist.use_gpu else "gloo")
    run_dir = Path(loop_config["run_dir"])
    setup_logging(rank(), run_dir / "logs")
    log.info("worker pid %d is rank %d", os.getpid(), rank())

    def report(metrics: dict[str, Any], checkpoint: Path | None = None, name: str | None = None) -> None:
        # every rank reports the same number of times (Ray Train requires it); the call returns once
        # this rank's files are copied to storage
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint is not None else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    runner = PhaseRunner(cfg, run_dir, report, revision=loop_config.get("revision", "unknown"))
    latest = ray.train.get_checkpoint()
    if latest is None:
        runner.run()
        return
    # the checkpoint is read before the first new report, so pruning cannot remove it while in use
    with latest.as_directory() as directory:
        restore = _complete(Path(directory), checkpoint_root(run_dir) / cfg.name)
        if restore != Path(directory):
            # Ray still lists the damaged checkpoint and the ones between: writing under their names again
            # would let its pruning delete the new files
            runner.checkpoint_suffix = f"-redo{int(time.time())}"
        runner.run(restore=restore)


def _complete(directory: Path, experiment: Path) -> Path:
    """`directory` if it is a complete checkpoint, else the newest complete one before it in the local
    storage `experiment` (a checkpoint damaged after Ray registered it); raises naming what is wrong."""
    from iil_dist.engine.checkpoint import CheckpointError, newest_complete, read_state

    try:
        read_state(directory)
        return directory
    except CheckpointError as err:
        names = sorted(p.name for p in experiment.iterdir()) if experiment.is_dir() else []
        older = [experiment / n for n in names if n.startswith("phase") and n < directory.name]
        fallback = newest_complete(older)
        if fallback is None:
            raise CheckpointError(f"{err}; and no complete checkpoint before it in {experiment}") from None
        log.warning("%s; resuming from the newest complete checkpoint before it, %s", err, fallback)
        return fallback


def checkpoint_root(run_dir: Path) -> Path:
    """Ray Train's storage path: checkpoints of run `NAME` live under `RUN_DIR/checkpoints/NAME/`."""
    return run_dir / "checkpoints"


def _has_checkpoints(run_dir: Path, name: str) -> bool:
    experiment = checkpoint_root(run_dir) / name
    return experiment.is_dir() and any(p.is_dir() for p in experiment.iterdir())


def _prepare_run_dir(run_dir: Path, cfg: Config, resume: bool) -> bool:
    """Gets the run directory ready; returns whether the run continues from its own checkpoints.

    A finished run (results.json present) with the same name is moved aside, never mixed in or
    deleted. An unfinished one continues when its config agrees with this one, and is refused
    otherwise, with the fields that differ.
    """
    saved_path = run_dir / "config.json"
    # checkpoints on a URI (checkpoint.storage_path) are Ray's to find; locally, look for them
    has_checkpoints = bool(cfg.checkpoint.storage_path) or _has_checkpoints(run_dir, cfg.name)
    unfinished = run_dir.is_dir() and not (run_dir / "results.json").exists() and has_checkpoints
    if resume or (unfinished and saved_path.is_file()):
        if not saved_path.is_file():
            raise ConfigError(f"--resume {run_dir}: no config.json there, so it is not a run directory")
        conflicts = resume_conflicts(load(saved_path), cfg)
        if conflicts:
            raise ConfigError(
                f"{run_dir} holds an unfinished run with other values of {', '.join(conflicts)}; resume it with "
                f"`iil-dist train --resume {run_dir}` (only dist., tracking. and checkpoint. fields may change) "
                "or choose another name"
            )
        log.info("continuing the run in %s from its last checkpoint", run_dir)
        saved_path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        return True
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("run directory %s exists; moving it to %s", run_dir, aside)
        shutil.move(str(run_dir), str(aside))
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return False


def check_world_fits(cfg: Config, manifest: dict[str, Any]) -> None:
    """Every rank needs at least one sample of every split it reads; say so before any worker starts."""
    workers = cfg.dist.num_workers
    for split, entry in manifest["splits"].items():
        if entry["num_samples"] < workers:
            raise ConfigError(
                f"dist.num_workers={workers}: split {split} of {cfg.data.scenario_dir} has only "
                f"{entry['num_samples']} samples, and every rank needs at least one"
            )


def resolve_paths(cfg: Config) -> Config:
    """The config with absolute run and scenario paths: workers may run in another directory."""
    cfg = from_dict(to_dict(cfg) | {"run_root": str(Path(cfg.run_root).resolve())})
    cfg.data.root = str(cfg.data.scenario_dir.resolve())
    return cfg


def connect(cfg: Config) -> bool:
    """Starts a local Ray cluster in-process, or joins the one named by RAY_ADDRESS, unless this process is
    connected already; returns whether it connected (and so should shut Ray down when done)."""
    import ray

    if ray.is_initialized():
        return False
    env = dict(_WORKER_ENV)
    if cfg.dist.use_gpu:
        env.pop("DS_ACCELERATOR")
    env["WANDB_MODE"] = os.environ.get("WANDB_MODE", cfg.tracking.wandb_mode)
    # a report waits for the controller to take the previous one, and the controller looks every
    # poll interval (Ray's default, 2 s, would make every checkpoint cost up to 2 s)
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.dist.poll_interval_s)
    # a driver started by `ray job submit` already runs in the job's runtime env, and Ray refuses a
    # ray.init env var that the job sets too: pass on only what this process does not already have
    env = {k: v for k, v in env.items() if os.environ.get(k) != v}
    address = os.environ.get("RAY_ADDRESS")
    # on a local cluster the console is rank 0's log file (see launch); Ray's forwarding of every worker's
    # output (and Ray Train's own messages) stays in /tmp/ray/session_latest/logs. "local" always starts a
    # new cluster: without it Ray would try to join the last `ray start` on this machine, and hang for
    # minutes when that one is gone but its address file is not
    ray.init(
        address=address or "local", include_dashboard=False, runtime_env={"env_vars": env},
        log_to_driver=address is not None,
    )  # fmt: skip
    log.info("ray: %s, %s", f"cluster at {address}" if address else "local cluster", ray.cluster_resources())
    return True


def launch(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Runs the experiment on a Ray cluster (RAY_ADDRESS, or a local one started here)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = resolve_paths(cfg)
    try:  # a missing or broken scenario stops here, before Ray starts
        manifest = read_manifest(cfg.data.scenario_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_world_fits(cfg, manifest)
    run_dir = cfg.run_dir
    _prepare_run_dir(run_dir, cfg, resume)
    revision = code_revision()
    log.info("code revision %s; run directory %s", revision, run_dir)

    started_here = connect(cfg)
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
                name=cfg.name,
                storage_path=cfg.checkpoint.storage_path or str(checkpoint_root(run_dir)),
                failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            ),
        )
        # on this machine's cluster (started here, or by a study) rank 0's log file is right here
        local = os.environ.get("RAY_ADDRESS") is None
        console = LogFollower(run_dir / "logs" / "rank0.log") if local else contextlib.nullcontext()
        with console:
            result = trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    results_path = run_dir / "results.json"
    if not results_path.exists():
        # rank 0 ran on another node whose run directory this driver does not see: the results came
        # with its last report
        reported = (result.metrics or {}).get("results")
        if reported is None:
            raise RuntimeError(f"training finished without writing {results_path}; see {run_dir / 'logs'}")
        atomic_write_json(results_path, reported)
        log.warning("rank 0 wrote results.json on another node; run_root should be storage all nodes share")
    return json.loads(results_path.read_text())
