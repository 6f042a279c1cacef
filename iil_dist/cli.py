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


def cmd_prepare(cfg: config_mod.Config, force: bool) -> int:
    from iil_dist.data.shards import prepare_scenario

    prepare_scenario(cfg.data, force=force)  # logs what it wrote
    return 0


def cmd_train(cfg: config_mod.Config, resume: bool) -> int:
    from iil_dist.engine.progress import format_table
    from iil_dist.orchestration.ray_train import launch

    results = launch(cfg, resume=resume)
    sys.stdout.write("\n" + format_table(results) + "\n")
    sys.stdout.write(f"\nresults: {Path(cfg.run_dir).resolve() / 'results.json'}\n")
    return 0


def cmd_study(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from iil_dist.report.study import format_summary, run_study

    study = run_study(
        cfg, args.name, args.variants.split(","), _int_list(args.orders), _int_list(args.phases), args.sweep or ()
    )
    sys.stdout.write("\n" + format_summary(study) + "\n")
    sys.stdout.write(f"\nstudy: {Path(cfg.run_root).resolve() / args.name / 'study.json'}\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from iil_dist.report.report import write_report

    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else (paths[0] if len(paths) == 1 else Path("report"))
    try:
        report = write_report(paths, out, wandb_mode=args.wandb_mode)
    except ValueError as err:
        sys.stderr.write(f"iil-dist: report: {err}\n")
        return 2
    sys.stdout.write(f"report: {report.resolve()}\n")
    return 0


def _int_list(text: str | None) -> list[int] | None:
    """`0-4` or `5,10,20` as a list of integers."""
    if not text:
        return None
    try:
        if "-" in text:
            low, high = text.split("-", 1)
            return list(range(int(low), int(high) + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise config_mod.ConfigError(f"expected a range such as 0-4 or a list such as 5,10,20, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iil-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("prepare", "write a scenario's WebDataset shards and manifest"),
                       ("train", "run an instance-incremental experiment on Ray + DeepSpeed"),
                       ("study", "run method variants x data orders (x phase counts) and aggregate PP/F")):  # fmt: skip
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/digits.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.ema_alpha=0.8")
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="rewrite a scenario prepared with other settings")
        elif name == "study":
            from iil_dist.report.study import VARIANTS

            p.add_argument("--name", required=True, help="study name: its runs go to RUN_ROOT/NAME/")
            p.add_argument("--variants", default="dbd,finetune", help=f"comma-separated, from {', '.join(VARIANTS)}")
            p.add_argument("--orders", default="0-4", help="data.order_seed values: a range 0-4 or a list 0,2,5")
            p.add_argument("--phases", help="numbers of phases for the task-count study, e.g. 5,10,20")
            p.add_argument(
                "--sweep", action="append", metavar="FIELD=V1,V2",
                help="also run each variant with FIELD set to each value, one field at a time (repeatable)",
            )  # fmt: skip
        else:
            p.add_argument(
                "--resume",
                metavar="RUN_DIR",
                help="continue the run in RUN_DIR from its last checkpoint, with its saved config.json; "
                "positional arguments are then overrides (dist., tracking. and checkpoint. fields)",
            )
    sub.add_parser("fields", help="list every config field with its default and description")
    report = sub.add_parser(
        "report", help="report.md and plots of a study or of runs", description="report.md and plots of a "
        "study directory (study.json) or of run directories (results.json), aggregated over data orders",
    )  # fmt: skip
    report.add_argument("paths", nargs="+", help="study or run directories")
    report.add_argument("--out", help="output directory; default: the one path given, else ./report")
    report.add_argument("--wandb-mode", default="offline", help="offline, online or disabled (WANDB_MODE wins)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may also follow the options (`study CONFIG --name N data.drift=none`): argparse leaves
    # positionals after an option unparsed, so dotted assignments among the leftovers are overrides too
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    setup_logging(rank=0)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.command == "fields":
        sys.stdout.write("\n".join(config_mod.describe()) + "\n")
        return 0
    if args.command == "report":
        return cmd_report(args)
    resume = getattr(args, "resume", None)
    try:
        cfg = _load_config(args.config, args.overrides, resume)
    except config_mod.ConfigError as err:
        sys.stderr.write(f"iil-dist: config error: {err}\n")
        return 2
    log.info("config %s: %s", args.config or f"{resume}/config.json", json.dumps(config_mod.to_dict(cfg)))
    if args.command == "study":
        try:
            return cmd_study(cfg, args)
        except config_mod.ConfigError as err:
            sys.stderr.write(f"iil-dist: {err}\n")
            return 2
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
