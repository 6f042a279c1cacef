"""`iil-dist report PATH...`: report.md and PNG plots from a study directory or from run directories.

A study directory (holding study.json) brings its runs; a run directory (holding results.json) is one
order of the variant its config describes. Runs of the same variant and number of phases are aggregated
over orders (mean ± 95% t-interval, see report/study.py). Written to the output directory:

    report.md        final PP_T / F_T per variant, METHOD.md §8's claims checked (report/claims.py), then
                     PP_t and F_t of teacher and student per phase
    pp_f.png         PP_t and F_t per phase, teacher and student, one line and CI band per variant
    final.png        PP_T and F_T of the teacher per variant as bars with CI whiskers (the ablation chart)

The images are also logged to a wandb run of job type "report" in the study's group.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from iil_dist.report.claims import claims_markdown, paired
from iil_dist.report.study import MODELS, summarize, t_interval

# the variant a run's config describes: baselines by name, DBD by its switches (METHOD.md §5)
_DBD_VARIANTS = {(True, True, True): "dbd", (True, True, False): "fl_dis", (True, False, False): "fl_only",
                 (False, True, False): "dis_only"}  # fmt: skip


def variant_of(config: dict[str, Any]) -> str:
    m = config["method"]
    if m["name"] != "dbd":
        return m["name"]
    switches = (m["fused_label"], m["dusting"], m["consolidation"])
    return _DBD_VARIANTS.get(switches, "dbd-" + "".join("1" if s else "0" for s in switches))


def load_runs(paths: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    """The runs under `paths` (study or run directories) and a name for the report."""
    runs: list[dict[str, Any]] = []
    names = []
    for path in paths:
        study, results = path / "study.json", path / "results.json"
        if study.is_file():
            data = json.loads(study.read_text())
            runs += data["runs"]
            names.append(data["name"])
        elif results.is_file():
            data = json.loads(results.read_text())
            runs.append({"variant": variant_of(data["config"]), "num_phases": data["num_phases"],
                         "order": data["config"]["data"]["order_seed"], "run_dir": str(path),
                         "phases": data["phases"]})  # fmt: skip
            # runs of a study carry its name as their wandb group
            names.append(data["config"].get("tracking", {}).get("group") or data["config"]["name"])
        else:
            raise ValueError(f"{path}: neither a study directory (study.json) nor a run directory (results.json)")
    if not runs:
        raise ValueError("no runs to report")
    unique = list(dict.fromkeys(names))
    return ("+".join(unique) if len(unique) <= 2 else f"{unique[0]} and {len(unique) - 1} more runs"), runs


def write_report(paths: list[Path], out: Path, wandb_mode: str = "offline", project: str = "iil-dist") -> Path:
    """Writes report.md, pp_f.png and final.png into `out` and logs the images to wandb; returns report.md."""
    name, runs = load_runs(paths)
    rows = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    _plot_phases(rows, out / "pp_f.png", name)
    _plot_final(rows, out / "final.png", name)
    report = out / "report.md"
    report.write_text(_markdown(name, runs, rows))
    _log_images(name, out, wandb_mode, project)
    return report


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by.setdefault(f"{row['variant']} (T={row['num_phases']})", []).append(row)
    return by


def _plot_phases(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True, layout="constrained")
    by = _series(rows)
    many = len(by) > 10  # a sweep: twenty colours, so no two lines share one, and fainter bands
    colors = plt.cm.tab20.colors if many else plt.cm.tab10.colors
    for (label, series), color in zip(by.items(), colors * 3, strict=False):
        label = _short(label)
        phases = [r["phase"] for r in series]
        for i, metric in enumerate(("pp", "f")):
            for j, model in enumerate(MODELS):
                ax = axes[i][j]
                mean = [r[f"{model}/{metric}"]["mean"] for r in series]
                ci = [r[f"{model}/{metric}"]["ci"] for r in series]
                ax.plot(phases, mean, marker="o", markersize=3, color=color, label=label)
                if not any(math.isnan(c) for c in ci):
                    low = [m - c for m, c in zip(mean, ci, strict=True)]
                    high = [m + c for m, c in zip(mean, ci, strict=True)]
                    ax.fill_between(phases, low, high, color=color, alpha=0.06 if many else 0.15)
    for i, label in enumerate(("performance promotion PP_t", "forgetting F_t")):
        for j, model in enumerate(MODELS):
            ax = axes[i][j]
            ax.set_title(f"{model}: {label}")
            ax.set_ylabel("points vs the base model")
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xlabel("phase")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    fig.suptitle(f"{name}: mean and 95% CI over orders")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(variant: str) -> str:
    """A sweep variant's label without the field's section: "dbd+method.sigma=2" -> "dbd+sigma=2"."""
    base, plus, change = variant.partition("+")
    if not plus:
        return variant
    field, _, value = change.partition("=")
    return f"{base}+{field.rsplit('.', 1)[-1]}={value}"


def _plot_final(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = [r for r in rows if r["phase"] == r["num_phases"]]
    counts = {r["num_phases"] for r in final}
    # the number of phases goes into the labels only when the bars differ in it
    names = [_short(r["variant"]) for r in final]
    labels = [n if len(counts) == 1 else f"{n}\n(T={r['num_phases']})" for n, r in zip(names, final, strict=True)]
    crowded = len(final) > 6  # a sweep: widen the figure and slant the labels so they stay readable
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.1 * len(final)), 4.5 if crowded else 4), constrained_layout=True)
    for ax, metric, title in zip(axes, ("pp", "f"), ("PP_T (higher is better)", "F_T (lower is better)"), strict=True):
        mean = [r[f"teacher/{metric}"]["mean"] for r in final]
        ci = [0.0 if math.isnan(r[f"teacher/{metric}"]["ci"]) else r[f"teacher/{metric}"]["ci"] for r in final]
        ax.bar(range(len(final)), mean, yerr=ci, capsize=4, color=plt.cm.tab10.colors[0 if metric == "pp" else 3])
        ax.set_xticks(
            range(len(final)), labels, fontsize=8, rotation=35 if crowded else 0, ha="right" if crowded else "center"
        )
        ax.set_ylabel("points vs the base model")
        ax.set_title(f"deployed model: {title}")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    last = f"phase {counts.pop()}" if len(counts) == 1 else "the last phase"
    fig.suptitle(f"{name}: after {last}, mean and 95% CI over orders")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(stat: dict[str, Any]) -> str:
    ci = "" if math.isnan(stat["ci"]) else f" ± {stat['ci']:.2f}"
    return f"{stat['mean']:+.2f}{ci}"


def _markdown(name: str, runs: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    orders = sorted({r["order"] for r in runs})
    lines = [f"# Report: {name}", "",
             f"{len(runs)} runs, orders {orders}. PP and F in accuracy points against the base model, mean ± "
             "half-width of the 95% confidence interval (t distribution, n - 1 degrees of freedom) over orders.",
             "", "## After the last phase", "",
             "| variant | T | n | teacher PP_T | teacher F_T | student PP_T | student F_T |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if r["phase"] == r["num_phases"]):
        cells = " | ".join(_cell(r[f"{m}/{k}"]) for m in MODELS for k in ("pp", "f"))
        lines.append(f"| {r['variant']} | {r['num_phases']} | {r['n']} | {cells} |")
    lines += [
        "",
        "![final](final.png)",
        "",
        *sweep_markdown(runs),
        *claims_markdown(runs),
        "## Per phase",
        "",
        "![per phase](pp_f.png)",
        "",
    ]
    for label, series in _series(rows).items():
        lines += [f"### {label}", "", "| phase | teacher PP | teacher F | student PP | student F |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in series:
            cells = " | ".join(_cell(r[f"{m}/{k}"]) for m in MODELS for k in ("pp", "f"))
            lines.append(f"| {r['phase']} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def sweep_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """For a one-at-a-time sweep (variants named "VARIANT+FIELD=VALUE"): each value against the variant's
    default on the objective PP_T - F_T of the deployed teacher, paired by order.

    Two verdicts per value: with the 95% interval of that comparison alone, and family-wise, with the
    Bonferroni interval at 1 - 0.05/k for the k values swept around the same default (with k comparisons at
    95% each, about 0.05 k "better" or "worse" verdicts come by chance alone). A value replaces a default
    only where the family-wise verdict is "better"."""
    swept = sorted({(r["variant"], r["num_phases"]) for r in runs if "+" in r["variant"]})
    if not swept:
        return []

    def objective(variant: str, T: int) -> dict[int, float]:
        return {r["order"]: r["phases"][T]["teacher"]["pp"] - r["phases"][T]["teacher"]["f"]
                for r in runs if r["variant"] == variant and r["num_phases"] == T}  # fmt: skip

    def verdict(diff: float, half: float) -> str:
        return "not resolved" if math.isnan(half) or abs(diff) <= half else "better" if diff > 0 else "worse"

    family = Counter((v.split("+")[0], T) for v, T in swept)  # values swept around each default
    k = max(family.values())
    lines = ["## Sweep", "",
             "Objective: PP_T − F_T of the deployed teacher after the last phase, in points. Each swept value "
             "against the default, paired over the data orders both ran: mean ± 95% CI of the difference and "
             "its verdict, then the family-wise verdict, whose interval is widened for the number of values "
             f"swept around the same default (Bonferroni: {100 * (1 - 0.05 / k):.2f}% for {k}). Rule: a value "
             "replaces the default only where the family-wise verdict is better.", "",
             "| variant | T | objective | vs default | n | verdict | family-wise |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant, T in swept:
        base = variant.split("+")[0]
        default, value = objective(base, T), objective(variant, T)
        mean, ci = t_interval(list(value.values()))
        own = _cell({"mean": mean, "ci": ci})
        alone = paired(value, default)
        if alone is None:
            lines.append(f"| {variant} | {T} | {own} | (the default did not run) | 0 | not resolved | not resolved |")
            continue
        diff, half, n = alone
        _, wide, _ = paired(value, default, 1 - 0.05 / family[(base, T)])
        lines.append(f"| {variant} | {T} | {own} | {_cell({'mean': diff, 'ci': half})} | {n} | {verdict(diff, half)} | "
                     f"{verdict(diff, wide)} |")  # fmt: skip
    return [*lines, ""]


def _log_images(name: str, out: Path, wandb_mode: str, project: str) -> None:
    from iil_dist.tracking.tracker import resolve_wandb_mode

    mode = resolve_wandb_mode(wandb_mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=project, group=name, name=f"{name}-report", job_type="report", dir=str(out), mode=mode)
    run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in (out / "pp_f.png", out / "final.png")})
    run.finish()
