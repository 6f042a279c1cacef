"""METHOD.md §8's claims checked on runs with known final metrics: paired intervals and each verdict rule."""

import pytest

from iil_dist.report.claims import FAILS, HOLDS, OPEN, UNMEASURABLE, check_claims, claims_markdown
from iil_dist.report.study import t_interval


def _run(variant: str, order: int, pp: float, f: float, student_pp: float | None = None, T: int = 10) -> dict:
    final = {"teacher": {"pp": pp, "f": f}, "student": {"pp": pp if student_pp is None else student_pp, "f": f}}
    return {"variant": variant, "order": order, "num_phases": T, "phases": [None] * T + [final]}


def _study(**finals: list[tuple[float, float]]) -> list[dict]:
    return [_run(v.replace("_student", ""), k, *vals) for v, rows in finals.items() for k, vals in enumerate(rows)]


def _by_number(claims):
    return {c.number: c for c in claims}


def test_the_claims_hold_on_a_study_that_shows_them():
    """Guards against verdicts that ignore the pairing by order or the direction of a claim."""
    runs = _study(
        dbd=[(25.0, 1.0, 24.0), (26.0, 1.5, 24.5), (24.0, 0.5, 23.2)],
        finetune=[(20.0, 10.0), (21.0, 12.0), (19.5, 11.0)],
        lwf=[(22.0, 5.0), (23.5, 6.0), (21.0, 4.0)],
        fl_dis=[(24.0, 1.0), (25.0, 1.0), (23.5, 1.0)],
        fl_only=[(23.0, 2.0), (24.5, 2.0), (23.0, 2.0)],
        dis_only=[(0.5, 0.1), (0.8, 0.2), (0.2, 0.0)],
    )
    runs += [_run("dbd", k, pp, f, T=20) for k, (pp, f) in enumerate([(25.5, 2.0), (25.5, 2.6), (24.0, 1.6)])]
    claims = _by_number(check_claims(runs))
    assert {n: c.verdict for n, c in claims.items()} == {1: HOLDS, 2: HOLDS, 3: HOLDS, 4: HOLDS}
    first = claims[1].comparisons[0]
    mean, ci = t_interval([5.0, 5.0, 4.5])  # dbd - finetune, order by order
    assert (first.mean, first.ci, first.n) == (pytest.approx(mean), pytest.approx(ci), 3)
    assert claims[1].comparisons[2].text.endswith("dbd student")
    markdown = "\n".join(claims_markdown(runs))
    assert "| 1: **holds** | PP_T of dbd teacher − PP_T of finetune | +4.83 ± " in markdown


def test_claims_fail_or_stay_open_when_the_data_say_so():
    """Guards against a claim called held when its interval straddles zero, the comparison is reversed, the
    forgetting is lower but not by half, or DIS only promotes."""
    runs = _study(
        dbd=[(25.0, 6.0), (26.0, 7.0), (24.0, 5.0)],
        finetune=[(24.0, 10.0), (27.0, 12.0), (24.5, 11.0)],  # dbd - finetune straddles zero
        lwf=[(27.0, 5.0), (28.0, 6.0), (26.5, 4.0)],  # lwf is clearly better
        fl_dis=[(24.0, 1.0), (25.0, 1.0), (23.5, 1.0)],
        fl_only=[(24.5, 2.0), (25.2, 2.0), (23.7, 2.0)],  # fl_dis - fl_only: negative mean, straddles
        dis_only=[(20.0, 8.0), (21.0, 9.0), (19.0, 7.0)],  # promotes
    )
    claims = _by_number(check_claims(runs))
    one = [c.verdict for c in claims[1].comparisons]
    assert one[:2] == [OPEN, FAILS] and claims[1].verdict == FAILS
    assert claims[2].verdict == FAILS and "55% of finetune's" in claims[2].comparisons[0].text  # 18 / 33
    three = {c.text.split(" (")[0]: c.verdict for c in claims[3].comparisons}
    assert three["PP_T of dbd − PP_T of fl_dis"] == HOLDS
    assert three["PP_T of fl_dis − PP_T of fl_only"] == OPEN
    assert three["PP_T of dis_only"] == FAILS
    assert claims[4].verdict == OPEN and not claims[4].comparisons  # one phase count only


def test_claims_do_not_apply_where_nothing_promotes():
    """Guards against verdicts on a scenario where incremental learning is not measurable (the plain digits
    split, whose base model is already ~99%)."""
    runs = _study(dbd=[(0.2, 0.0), (0.0, 0.1)], finetune=[(0.2, 0.0), (-0.3, 0.4)], lwf=[(0.1, 0.0), (0.2, 0.0)])
    assert {c.verdict for c in check_claims(runs)} == {UNMEASURABLE}
    assert "not measurable in this scenario" in "\n".join(claims_markdown(runs))


def test_sweep_table_compares_each_value_with_the_default_by_order():
    """Guards against a sweep verdict taken from unpaired means or from the student, against a value called
    better when its interval straddles zero, and against a family-wise verdict that ignores how many values
    were swept."""
    from scipy.stats import t

    from iil_dist.report.report import sweep_markdown

    base = [(20.0, 4.0), (24.0, 4.0), (22.0, 6.0)]  # objective 16, 20, 16
    runs = _study(dbd=base)
    # +1 point on every order: resolved although the orders differ by 4 points, at any confidence
    runs += [_run("dbd+method.sigma=2", k, pp + 1.0, f, student_pp=0.0) for k, (pp, f) in enumerate(base)]
    runs += [
        _run("dbd+method.sigma=0.5", k, pp, f) for k, (pp, f) in enumerate([(20.0, 6.0), (24.0, 6.1), (22.0, 7.9)])
    ]
    runs += [_run("dbd+method.ema_alpha=0.8", k, pp, f) for k, (pp, f) in enumerate([(23.0, 4.0), (21.0, 4.0)])]
    # +1, +1.5, +2: better at 95% (half-width 1.24), not once widened for the 4 values swept around dbd
    runs += [
        _run("dbd+method.freeze_epochs=15", k, pp + d, f)
        for k, ((pp, f), d) in enumerate(zip(base, [1, 1.5, 2], strict=True))
    ]
    lines = sweep_markdown(runs)
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| dbd+")}
    assert rows["dbd+method.sigma=2"].endswith("| +1.00 ± 0.00 | 3 | better | better |")
    assert rows["dbd+method.sigma=0.5"].endswith("| 3 | worse | worse |")
    assert rows["dbd+method.ema_alpha=0.8"].endswith("| +0.00 ± 38.12 | 2 | not resolved | not resolved |")
    assert rows["dbd+method.freeze_epochs=15"].endswith("| +1.50 ± 1.24 | 3 | better | not resolved |")
    assert 0.5 * t.ppf(1 - 0.05 / 8, 2) / 3**0.5 > 1.5  # the family-wise half-width the row was judged by
    assert any("Bonferroni: 98.75% for 4" in line for line in lines)
    assert sweep_markdown(_study(dbd=[(20.0, 4.0)])) == []
