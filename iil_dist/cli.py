"""The `iil-dist` command: `prepare` writes a scenario's shards, `train` runs an experiment."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from iil_dist import config as config_mod
from iil_dist.tracking.logs import setup_logging

log = logging.getLogger("iil_dist.cli")


def _scenario_args(cfg: config_mod.Config) -> dict:
    from iil_dist.data.shards import SCENARIO_ARGS

    return {name: getattr(cfg.data, name) for name in SCENARIO_ARGS}


def cmd_prepare(cfg: config_mod.Config, force: bool) -> int:
    from iil_dist.data.shards import read_manifest, write_scenario

    out = cfg.data.scenario_dir
    args = _scenario_args(cfg)
    if (out / "manifest.json").exists() and not force:
        try:
            manifest = read_manifest(out)
        except ValueError as err:  # e.g. written by an older version of the format
            raise SystemExit(f"{err}; pass --force to rewrite it") from None
        if all(manifest.get(k) == v for k, v in args.items()):
            log.info("scenario %s is already prepared with these settings; nothing to do", out)
            return 0
        raise SystemExit(
            f"{out / 'manifest.json'} was written with other settings; choose another data.root or pass --force"
        )
    d = cfg.data
    write_scenario(out, **args, source_path=d.source_path, num_workers=d.prepare_workers, progress=True)
    return 0


def cmd_train(cfg: config_mod.Config, resume: bool) -> int:
    from iil_dist.engine.progress import format_table
    from iil_dist.orchestration.ray_train import launch

    results = launch(cfg, resume=resume)
    sys.stdout.write("\n" + format_table(results) + "\n")
    sys.stdout.write(f"\nresults: {Path(cfg.run_dir).resolve() / 'results.json'}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iil-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "write a scenario's WebDataset shards and manifest"),
                       ("train", "run an instance-incremental experiment on Ray + DeepSpeed")):  # fmt: skip
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/digits.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.ema_alpha=0.8")
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="rewrite a scenario prepared with other settings")
        else:
            p.add_argument(
                "--resume",
                metavar="RUN_DIR",
                help="continue the run in RUN_DIR from its last checkpoint, with its saved config.json; "
                "positional arguments are then overrides (dist., tracking. and checkpoint. fields)",
            )
    sub.add_parser("fields", help="list every config field with its default and description")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(rank=0)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.command == "fields":
        sys.stdout.write("\n".join(config_mod.describe()) + "\n")
        return 0
    resume = getattr(args, "resume", None)
    try:
        cfg = _load_config(args.config, args.overrides, resume)
    except config_mod.ConfigError as err:
        sys.stderr.write(f"iil-dist: config error: {err}\n")
        return 2
    log.info("config %s: %s", args.config or f"{resume}/config.json", json.dumps(config_mod.to_dict(cfg)))
    if args.command == "prepare":
        try:
            return cmd_prepare(cfg, args.force)
        except ValueError as err:  # a missing or malformed source, named by the message
            sys.stderr.write(f"iil-dist: prepare: {err}\n")
            return 2
    try:
        return cmd_train(cfg, resume=resume is not None)
    except config_mod.ConfigError as err:  # e.g. an unfinished run with other settings
        sys.stderr.write(f"iil-dist: {err}\n")
        return 2


def _load_config(path: str | None, overrides: list[str], resume: str | None) -> config_mod.Config:
    """The run's config: a recipe plus overrides, or, with --resume, the run directory's saved config."""
    if resume is None:
        if path is None:
            raise config_mod.ConfigError("a config file is required, e.g. configs/digits.yaml (or --resume RUN_DIR)")
        return config_mod.load(path, overrides)
    run_dir = Path(resume)
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise config_mod.ConfigError(f"--resume {run_dir}: no config.json there, so it is not a run directory")
    # with --resume every positional argument is an override; the run keeps its directory even if moved
    overrides = [*([path] if path else []), *overrides]
    location = [f"run_root={run_dir.resolve().parent}", f"name={run_dir.name}"]
    return config_mod.load(saved, [*overrides, *location])


if __name__ == "__main__":
    sys.exit(main())
