"""A study: one experiment per (method variant, number of phases, data order), aggregated over orders.

Each run is a normal `iil-dist train` run in `<run_root>/<study>/<variant>-t<T>-order<k>/`, so it can be
inspected, reported and resumed on its own; finished runs with the same settings are reused, so an
interrupted study continues where it stopped. All runs share one Ray session. PP_t and F_t of teacher and
student are aggregated over orders as mean ± half-width of the 95% confidence interval of the t
distribution with n - 1 degrees of freedom (METHOD.md §3), written to `<study dir>/study.json`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iil_dist.config import Config, ConfigError, from_dict, resume_conflicts, to_dict

log = logging.getLogger(__name__)

# method variants by name: the baselines of METHOD.md §7 and the DBD ablations of §5
VARIANTS: dict[str, list[str]] = {
    "dbd": ["method.name=dbd"],
    "fl_dis": ["method.name=dbd", "method.consolidation=false"],
    "fl_only": ["method.name=dbd", "method.dusting=false", "method.consolidation=false"],
    "dis_only": ["method.name=dbd", "method.fused_label=false", "method.consolidation=false"],
    "finetune": ["method.name=finetune"],
    "lwf": ["method.name=lwf"],
    "mean_teacher": ["method.name=mean_teacher"],
    "joint": ["method.name=joint"],
}
MODELS = ("teacher", "student")
METRICS = ("test_acc", "base_acc", "pp", "f")


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided `confidence` interval of the mean (t distribution, n - 1
    degrees of freedom); the half-width is nan for a single value."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        raise ValueError("no values to aggregate")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, num_phases, phase): every metric of teacher and student as mean, ci and n over orders."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["variant"], run["num_phases"]), []).append(run)
    rows = []
    for (variant, num_phases), members in groups.items():
        for phase in range(num_phases + 1):
            row: dict[str, Any] = {"variant": variant, "num_phases": num_phases, "phase": phase, "n": len(members)}
            for model in MODELS:
                for metric in METRICS:
                    values = [m["phases"][phase][model][metric] for m in members]
                    mean, ci = t_interval(values)
                    row[f"{model}/{metric}"] = {"mean": mean, "ci": ci, "values": values}
            rows.append(row)
    return rows


def expand_variants(variants: Sequence[str], sweep: Sequence[str] = ()) -> dict[str, list[str]]:
    """The overrides of every variant of a study: each named variant, and, for a one-at-a-time sweep, each
    variant with one field set to one of its values ("FIELD=V1,V2,..."), named "VARIANT+FIELD=V"."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"study: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    expanded = {v: list(VARIANTS[v]) for v in variants}
    for spec in sweep:
        field, _, values = spec.partition("=")
        if not field or not values:
            raise ConfigError(f"study: --sweep takes FIELD=V1,V2,..., got {spec!r}")
        for variant in variants:
            for value in values.split(","):
                expanded[f"{variant}+{field}={value}"] = [*VARIANTS[variant], f"{field}={value}"]
    return expanded


def run_study(
    cfg: Config,
    name: str,
    variants: Sequence[str],
    orders: Sequence[int],
    phases: Sequence[int] | None = None,
    sweep: Sequence[str] = (),
) -> dict[str, Any]:
    """Prepares every scenario, runs every (variant, T, order) not finished yet, writes and returns study.json."""
    import ray

    from iil_dist.data.shards import prepare_scenario
    from iil_dist.orchestration.ray_train import connect, launch

    expanded = expand_variants(variants, sweep)
    base = to_dict(cfg)
    for overrides in expanded.values():
        from_dict(base, overrides)  # a bad sweep field or value stops the study before anything runs
    if cfg.data.root:
        raise ConfigError("data.root: leave it empty in a study, each order gets its own derived scenario directory")
    study_dir = Path(cfg.run_root) / name
    phases = list(phases or [cfg.data.num_phases])
    runs = []
    started = connect(cfg)  # one Ray session for every run of the study
    try:
        for num_phases in phases:
            for order in orders:
                scenario = [f"data.num_phases={num_phases}", f"data.order_seed={order}"]
                prepare_scenario(from_dict(base, scenario).data, progress=False)
                for variant, variant_overrides in expanded.items():
                    overrides = [*scenario, *variant_overrides, f"run_root={study_dir}",
                                 f"name={variant}-t{num_phases}-order{order}", f"tracking.group={name}"]  # fmt: skip
                    run_cfg = from_dict(base, overrides)
                    results = _finished(run_cfg) or launch(run_cfg)
                    runs.append({"variant": variant, "num_phases": num_phases, "order": order,
                                 "run_dir": str(run_cfg.run_dir), "phases": results["phases"]})  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    study = {"name": name, "variants": list(expanded), "sweep": list(sweep), "orders": list(orders), "phases": phases,
             "confidence": 0.95, "runs": runs, "summary": summarize(runs)}  # fmt: skip
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    return study


def _finished(cfg: Config) -> dict[str, Any] | None:
    """The results of a finished run of exactly this experiment, if there is one."""
    path = cfg.run_dir / "results.json"
    if not path.is_file():
        return None
    from iil_dist.orchestration.ray_train import resolve_paths

    results = json.loads(path.read_text())
    if resume_conflicts(from_dict(results["config"]), resolve_paths(cfg)):
        return None
    log.info("reusing the finished run %s", cfg.run_dir)
    return results


def format_summary(study: dict[str, Any]) -> str:
    """The final phase of every (variant, T) as a table: PP_T and F_T of teacher and student, mean ± CI."""
    header = " ".join(f"{h:>15}" for h in ("teacher PP", "teacher F", "student PP", "student F"))
    lines = [f"study {study['name']}: PP_T and F_T in points, mean ± 95% CI over {len(study['orders'])} orders",
             f"{'variant':<14} {'T':>3} | {header}"]  # fmt: skip
    lines.append("-" * len(lines[-1]))
    for row in study["summary"]:
        if row["phase"] != row["num_phases"]:
            continue
        cells = [_cell(row[f"{m}/{k}"]) for m in MODELS for k in ("pp", "f")]
        lines.append(f"{row['variant']:<14} {row['num_phases']:>3} | {cells[0]:>15} {cells[1]:>15} | "
                     f"{cells[2]:>15} {cells[3]:>15}")  # fmt: skip
    return "\n".join(lines)


def _cell(stat: dict[str, float]) -> str:
    ci = "" if math.isnan(stat["ci"]) else f" ± {stat['ci']:.2f}"
    return f"{stat['mean']:+.2f}{ci}"
