"""The control scheme: {other} is another selected record's target_new (seeded draw, exclusion rule,
exact prompt strings)."""
import collections

import pytest

from assocmem.config import ConfigError
from assocmem.hijack.counterfact import Record, parse_records
from assocmem.hijack.schemes import control_others, custom_scheme, hijack_prompt, load_schemes
from assocmem.hijack.testing import records


def recs():
    return parse_records(records()).records


def test_needs_other_and_missing_other_is_a_reason():
    book = load_schemes()
    ctrl = book.get("control_other")
    assert ctrl.needs_other and ctrl.target == "new" and ctrl.template == "Do not think of {other}."
    assert not any(book.get(n).needs_other for n in book.schemes if n != "control_other")
    rec = recs()[0]
    assert ctrl.sentence(rec, book.countries) == (None, "no other record")
    assert ctrl.sentence(rec, book.countries, other="Manila") == ("Do not think of Manila.", "")
    # other schemes ignore ``other``
    assert book.get("generic_false").sentence(rec, book.countries, other="Manila") == ("Do not think of English.", "")
    assert custom_scheme("Forget {other} and {target_true}.").needs_other
    with pytest.raises(ConfigError, match="unknown placeholder"):
        custom_scheme("Do not think of {others}.")


def test_control_prompt_strings_k012():
    book = load_schemes()
    rs = recs()
    others = control_others(rs, seed=0)
    rec = rs[0]                                        # Danielle Darrieux, true French, new English
    o = others[rec.case_id]
    s, why = book.get("control_other").sentence(rec, book.countries, other=o)
    assert why == "" and s == f"Do not think of {o}." and o not in ("English", "French")
    p = rec.text
    assert hijack_prompt(s, p, 0) == "The mother tongue of Danielle Darrieux is"
    assert hijack_prompt(s, p, 1) == f"Do not think of {o}. The mother tongue of Danielle Darrieux is"
    assert hijack_prompt(s, p, 2) == f"Do not think of {o}. Do not think of {o}. The mother tongue of Danielle Darrieux is"


def test_control_others_exclusion_rule_and_determinism():
    rs = recs()
    a = control_others(rs, seed=3)
    assert a == control_others(rs, seed=3) == control_others(list(reversed(rs)), seed=3)   # order-free
    news = {r.target_new for r in rs}
    for r in rs:
        o = a[r.case_id]
        assert o in news and o not in (r.target_new, r.target_true)
    # records 0 and 5 both have target_new English: neither may get English from the other
    assert a[0] != "English" and a[5] != "English"
    draws = [tuple(sorted(control_others(rs, seed=s).items())) for s in range(20)]
    assert len(set(draws)) > 1                                          # the seed matters


def test_control_others_skips_impossible_and_handles_tiny_sets():
    def rec(cid, true, new):
        return Record(cid, "{} is", f"s{cid}", true, new)
    # every other record's target_new equals this record's true or new target -> no valid other
    rs = [rec(0, "A", "B"), rec(1, "C", "A"), rec(2, "D", "B")]
    out = control_others(rs, seed=0)
    assert 0 not in out and out[1] == "B" and out[2] == "A"
    assert control_others([rec(0, "A", "B")], seed=0) == {}
    assert control_others([], seed=0) == {}


def test_control_others_is_uniform_over_valid_records():
    def rec(cid, true, new):
        return Record(cid, "{} is", f"s{cid}", true, new)
    # record 0 can draw records 1..3 (new X, X, Y); record 4 has new = 0's true, never valid
    rs = [rec(0, "T", "N"), rec(1, "a", "X"), rec(2, "b", "X"), rec(3, "c", "Y"), rec(4, "d", "T")]
    counts = collections.Counter(control_others(rs, seed=s)[0] for s in range(3000))
    assert set(counts) == {"X", "Y"}
    assert counts["X"] / 3000 == pytest.approx(2 / 3, abs=0.03)


def test_control_others_on_shared_data(shared_data):
    from assocmem.hijack.counterfact import load_counterfact, select
    rs = select(load_counterfact(shared_data / "counterfact" / "counterfact.json.gz").records, n=500, seed=0)
    out = control_others(rs, seed=0)
    assert len(out) == len(rs)
    by_id = {r.case_id: r for r in rs}
    assert all(o not in (by_id[c].target_new, by_id[c].target_true) for c, o in out.items())
