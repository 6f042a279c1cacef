"""METHOD.md §8's four claims checked on a set of runs, each comparison with a paired 95% confidence interval.

Variants that ran on the same data orders are compared order by order: the difference of a final-phase
metric between them is taken per order, and the mean ± half-width of its t-interval decides the verdict:

- a strict claim (a > b) holds when the whole interval lies above zero, fails when it lies below, and is
  not resolved by these orders when it straddles zero;
- a weak claim (a ≥ b) fails only when the whole interval lies below zero, holds when the mean is not
  below zero, and is not resolved otherwise;
- "much lower" (claims 2 and 3) also asks the lower F_T to be at most half of the other;
- "does not promote" asks the whole interval of PP_T to lie below `NO_PROMOTION` points;
- "about the same" (claim 4) asks the interval of the difference to lie within ± `SAME_PP` points.

A scenario where no variant's deployed model promotes by `MEASURABLE` points or more is one where
incremental learning is not measurable (METHOD.md §8's precondition): its claims are reported as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from iil_dist.report.study import t_interval

HOLDS, FAILS, OPEN, UNMEASURABLE = "holds", "fails", "not resolved", "not measurable"
MEASURABLE = 1.0  # points of PP_T some variant must reach for the scenario to count
NO_PROMOTION = 2.0  # points of PP_T under which a model "does not promote"
SAME_PP = 2.0  # points within which two PP_T are "about the same"
MUCH_LOWER = 0.5  # "much lower": at most this share of the other


@dataclass
class Comparison:
    """One measured comparison: what it is, the paired difference (or the value), and its verdict."""

    text: str
    mean: float
    ci: float
    n: int
    verdict: str

    def cell(self) -> str:
        ci = "" if math.isnan(self.ci) else f" ± {self.ci:.2f}"
        return f"{self.mean:+.2f}{ci}"


@dataclass
class Claim:
    number: int
    text: str
    comparisons: list[Comparison]
    verdict: str


CLAIMS = {
    1: "the full method's teacher has a higher PP_T than fine-tuning, LwF and its own student",
    2: "its F_T is much lower than fine-tuning's",
    3: "each component adds: full ≥ FL + DIS ≥ FL only in PP_T; DIS only does not promote but forgets far "
    "less than fine-tuning",
    4: "with the same total new data split into more phases, PP_T stays about the same and F_T rises slightly",
}


def _finals(runs: list[dict[str, Any]], variant: str, model: str, metric: str, num_phases: int) -> dict[int, float]:
    """The final-phase metric of every order's run of (variant, T), by order."""
    return {r["order"]: r["phases"][num_phases][model][metric] for r in runs
            if r["variant"] == variant and r["num_phases"] == num_phases}  # fmt: skip


def paired(a: dict[int, float], b: dict[int, float], confidence: float = 0.95) -> tuple[float, float, int] | None:
    """Mean and `confidence` half-width of a - b over the orders both have, and their number (None: none)."""
    orders = sorted(set(a) & set(b))
    if not orders:
        return None
    mean, ci = t_interval([a[o] - b[o] for o in orders], confidence)
    return mean, ci, len(orders)


def _bounds(mean: float, ci: float) -> tuple[float, float]:
    return (mean, mean) if math.isnan(ci) else (mean - ci, mean + ci)


def _strict(mean: float, ci: float) -> str:
    low, high = _bounds(mean, ci)
    if math.isnan(ci):
        return OPEN
    return HOLDS if low > 0 else FAILS if high < 0 else OPEN


def _weak(mean: float, ci: float) -> str:
    low, high = _bounds(mean, ci)
    if not math.isnan(ci) and high < 0:
        return FAILS
    return HOLDS if mean >= 0 else OPEN


def _much_lower(runs: list[dict[str, Any]], variant: str, model: str, T: int) -> Comparison | None:
    """F_T of fine-tuning minus F_T of `variant`: lower by a resolved margin, and at most half of it."""
    lower, finetune = _finals(runs, variant, model, "f", T), _finals(runs, "finetune", "teacher", "f", T)
    difference = paired(finetune, lower)
    if difference is None:
        return None
    mean, ci, n = difference
    verdict = _strict(mean, ci)
    orders = sorted(set(lower) & set(finetune))
    share = sum(lower[o] for o in orders) / max(sum(finetune[o] for o in orders), 1e-9)
    if verdict == HOLDS and share > MUCH_LOWER:
        verdict = FAILS  # lower, but not by half
    text = f"F_T of finetune − F_T of {variant} {model} (theirs is {share:.0%} of finetune's)"
    return Comparison(text, mean, ci, n, verdict)


def _overall(comparisons: list[Comparison]) -> str:
    verdicts = {c.verdict for c in comparisons}
    if not comparisons:
        return OPEN
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts == {HOLDS} else OPEN


def check_claims(runs: list[dict[str, Any]], num_phases: int | None = None) -> list[Claim]:
    """The claims at `num_phases` (default: the most common T among the runs); a claim whose variants did
    not run has no comparisons and is not resolved."""
    counts = [r["num_phases"] for r in runs]
    T = num_phases if num_phases is not None else max(set(counts), key=counts.count)
    claims: list[Claim] = []

    def pp(variant: str, model: str = "teacher", at: int = T) -> dict[int, float]:
        return _finals(runs, variant, model, "pp", at)

    means = [sum(v.values()) / len(v) for v in (pp(variant) for variant in {r["variant"] for r in runs}) if v]
    best = max(means, default=0.0)

    def compare(text: str, a: dict[int, float], b: dict[int, float], rule: Any) -> list[Comparison]:
        difference = paired(a, b)
        return [] if difference is None else [Comparison(text, *difference[:2], difference[2], rule(*difference[:2]))]

    one = []
    for other, model in (("finetune", "teacher"), ("lwf", "teacher"), ("dbd", "student")):
        name = "dbd student" if model == "student" else other
        one += compare(f"PP_T of dbd teacher − PP_T of {name}", pp("dbd"), pp(other, model), _strict)
    claims.append(Claim(1, CLAIMS[1], one, _overall(one)))

    two = [c for c in [_much_lower(runs, "dbd", "teacher", T)] if c is not None]
    claims.append(Claim(2, CLAIMS[2], two, _overall(two)))

    three = compare("PP_T of dbd − PP_T of fl_dis (teachers)", pp("dbd"), pp("fl_dis"), _weak)
    three += compare("PP_T of fl_dis − PP_T of fl_only", pp("fl_dis"), pp("fl_only"), _weak)
    dis = pp("dis_only")
    if dis:
        mean, ci = t_interval(list(dis.values()))
        high = _bounds(mean, ci)[1]
        low = _bounds(mean, ci)[0]
        verdict = HOLDS if high < NO_PROMOTION else FAILS if low >= NO_PROMOTION else OPEN
        if math.isnan(ci):
            verdict = OPEN
        three.append(Comparison(f"PP_T of dis_only (does not promote: below {NO_PROMOTION:g})", mean, ci,
                                len(dis), verdict))  # fmt: skip
    three += [c for c in [_much_lower(runs, "dis_only", "teacher", T)] if c is not None]
    claims.append(Claim(3, CLAIMS[3], three, _overall(three)))

    four: list[Comparison] = []
    phase_counts = sorted({r["num_phases"] for r in runs if r["variant"] == "dbd"})
    if len(phase_counts) > 1:
        few, many = phase_counts[0], phase_counts[-1]
        difference = paired(pp("dbd", at=many), pp("dbd", at=few))
        if difference is not None:
            mean, ci, n = difference
            low, high = _bounds(mean, ci)
            verdict = OPEN if math.isnan(ci) else HOLDS if -SAME_PP <= low and high <= SAME_PP else (
                FAILS if high < -SAME_PP or low > SAME_PP else OPEN)  # fmt: skip
            four.append(Comparison(f"PP_T at T={many} − PP_T at T={few} (within ±{SAME_PP:g})", mean, ci, n, verdict))
        f_many, f_few = _finals(runs, "dbd", "teacher", "f", many), _finals(runs, "dbd", "teacher", "f", few)
        four += compare(f"F_T at T={many} − F_T at T={few} (rises)", f_many, f_few, _strict)
    claims.append(Claim(4, CLAIMS[4], four, _overall(four)))

    if best < MEASURABLE:
        for claim in claims:
            claim.verdict = UNMEASURABLE
    return claims


def claims_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """The claims as a markdown section: one row per comparison, the verdict of each claim in bold."""
    claims = check_claims(runs)
    lines = ["## METHOD.md §8 claims", "",
             "Paired over the data orders both sides ran; difference of the final-phase metric, mean ± 95% "
             "CI, in points (see iil_dist/report/claims.py for the rules).", ""]  # fmt: skip
    if claims and claims[0].verdict == UNMEASURABLE:
        lines += [f"No variant's deployed model promotes by {MEASURABLE:g} point or more here: incremental "
                  "learning is not measurable in this scenario, so the claims do not apply.", ""]  # fmt: skip
    lines += ["| claim | comparison | value | n | verdict |", "|---|---|---|---|---|"]
    for claim in claims:
        label = f"{claim.number}: **{claim.verdict}**"
        if not claim.comparisons:
            lines.append(f"| {label} | (its variants or phase counts did not run) | | | |")
        for c in claim.comparisons:
            lines.append(f"| {label} | {c.text} | {c.cell()} | {c.n} | {c.verdict} |")
            label = ""
    lines += ["", *(f"{c.number}. {c.text}" for c in claims), ""]
    return lines
