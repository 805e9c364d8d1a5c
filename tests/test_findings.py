"""Report records: provenance of reference numbers, the verdict rule for derived numbers, the rendered
reference column, and the induction checks that compare with the authors' code (C-2, C-10)."""
import math

import pytest

from assocmem import findings, report
from assocmem.experiments import induction, induction_checks as ic


@pytest.mark.parametrize("ours", [0.997, 0.5, 0.0, 1e6])
def test_derived_reference_is_never_agrees_or_disagrees(ours):
    c = findings.compare("x", ours, 0.997, 0.01, source="derived")
    assert c.verdict == "reference"
    assert (c.ours, c.reference, c.tol, c.source) == (ours, 0.997, 0.01, "derived")
    assert "law" in c.note and "not judged" in c.note


def test_paper_and_code_references_are_judged():
    assert findings.compare("x", 0.90, 0.91, 0.03, source="paper").verdict == "agrees"
    assert findings.compare("x", 0.80, 0.91, 0.03, source="paper").verdict == "disagrees"
    assert findings.compare("x", 0.80, 0.89, 0.15, source="code").verdict == "agrees"
    assert findings.compare("x", None, 0.89, 0.15, source="code").verdict == "missing"


def test_check_rejects_a_judged_derived_number_and_an_unsourced_reference():
    with pytest.raises(ValueError, match="derived"):
        findings.Check("x", 0.5, "agrees", 0.5, source="derived")
    with pytest.raises(ValueError, match="source"):
        findings.Check("x", 0.5, "agrees", 0.5)
    with pytest.raises(ValueError, match="source"):
        findings.Check("x", 0.5, "trend only", source="paper")
    with pytest.raises(ValueError, match="source"):
        findings.compare("x", 0.5, 0.5, 0.1, source="ours")


def test_rendered_rows_show_the_source_of_each_reference():
    sec = findings.Section("k", "T", families=[findings.Family("f", checks=[
        findings.compare("a", 0.92, 0.91, 0.03, source="paper"),
        findings.compare("b", 0.88, 0.89, 0.15, source="code"),
        findings.compare("c", 0.99, 0.997, 0.01, source="derived"),
        findings.trend("d", True, 1.0)])])
    md = report.to_markdown(sec)
    assert "| check | ours | sem | reference | tol | verdict | note |" in md
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ") and " | " in ln}
    assert "| 0.91 (paper) |" in rows["a"] and "| agrees |" in rows["a"]
    assert "| 0.89 (authors' code) |" in rows["b"]
    assert "| 0.997 (ours, derived) |" in rows["c"] and "| reference |" in rows["c"]
    assert "| – |" in rows["d"]
    html = report.to_html(sec)
    assert "<th>reference</th>" in html and "0.997 (ours, derived)" in html


def test_c2_tolerance_is_three_sd_of_the_mean():
    assert ic.c2_tolerance(0.0048, 2048) == pytest.approx(3 * 0.0048)
    assert ic.c2_tolerance(0.0048, 4 * 2048) == pytest.approx(1.5 * 0.0048)


def _record(t50: dict, acc: dict, final: float = 0.95) -> dict:
    steps = list(range(0, 1001, 5))
    curve = [max((v for s0, v in sorted(acc.items()) if s0 <= s), default=0.02) for s in steps]
    return {"acc_end": final, "curves": {"step": steps, "acc_end": curve},
            **{f"t50_{k}": v for k, v in t50.items()}}


def test_c10_agrees_with_the_authors_numbers_and_fails_when_off():
    sc = induction.SCALES["paper"]
    good = _record({"wk1": 15.0, "wo1": 160.0, "wk0_64": 200.0, "wk0": math.nan}, ic.AUTHORS_ACC_END)
    checks = ic.c10_checks(good, sc, "paper")
    assert {c.verdict for c in checks} == {"agrees", "trend holds"}
    assert all(c.source == "code" for c in checks if c.reference is not None)
    assert all("(paper scale)" in c.name for c in checks)
    # wo1 before wk1 (the old "top-down" reading), wo1 late, acc_end far below theirs
    bad = _record({"wk1": 100.0, "wo1": 50.0, "wk0_64": 400.0, "wk0": 500.0}, {0: 0.02, 200: 0.3})
    by = {c.name: c for c in ic.c10_checks(bad, sc, "paper")}
    assert by["C-10 (paper scale) probes cross 0.5 in the authors' order wk1 -> wo1 -> wk0_64 -> wk0"].verdict \
        == "trend fails"
    assert by["C-10 (paper scale) first step with wk0_64 >= 0.5"].verdict == "disagrees"
    assert by["C-10 (paper scale) acc_end at step 250"].verdict == "disagrees"
    # never crossing is a disagreement, not a missing value; quick scale says it uses other settings
    never = ic.c10_checks(_record({"wk1": math.nan}, ic.AUTHORS_ACC_END), induction.SCALES["quick"], "quick")
    wk1 = next(c for c in never if c.name.endswith("wk1 >= 0.5"))
    assert wk1.verdict == "disagrees" and "quick scale uses other settings" in wk1.note
    assert all(c.name.startswith("C-10 (quick scale)") for c in never)     # the name says which run it judges


def test_value_at_pairs_values_with_their_own_steps():
    """A training-batch curve lacks the final step's entry: values are still read at their own steps."""
    from assocmem.experiments.induction_checks import value_at
    steps = [0, 5, 10, 15]
    train_curve = [0.0, 0.5, 1.0]                     # no value for the final step 15
    assert value_at(steps, train_curve, 10) == 1.0 and value_at(steps, train_curve, 7) == 0.5
    assert value_at(steps, [0.0, 0.5, 1.0, 2.0], 15) == 2.0 and value_at(steps, train_curve, 20) is None
