"""Hijack leaderboard: k50 and its bootstrap CI, AUC, reverse drop, NS, control effect, per-relation
sums, rendering and the CLI over a store laid out as the score store writes it."""
import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from assocmem.hijack import evaluate
from assocmem.hijack import leaderboard as lb
from assocmem.hijack.leaderboard_render import figure, to_html, to_markdown


def table(es: dict, ns: dict | None = None, scheme="generic_false", rel=None) -> pd.DataFrame:
    """Per-record table: es = {k: [success per record]} (record i = case_id i); ns = {k: [[per prompt]]}."""
    rows = []
    for k, wins in es.items():
        for cid, w in enumerate(wins):
            r = rel[cid] if rel else "P103"
            rows.append(dict(case_id=cid, relation_id=r, scheme=scheme, k=k, kind="rewrite", prompt_index=0,
                             sentence="S", nll_new=1.0 if w else 2.0, nll_true=1.5, lp1_new=-1.0, lp1_true=-1.0,
                             n_new=1, n_true=1, mode_new="joint", mode_true="joint"))
    for k, per_rec in (ns or {}).items():
        for cid, prompts in enumerate(per_rec):
            for j, (nll_new, nll_true) in enumerate(prompts):
                rows.append(dict(case_id=cid, relation_id="P103", scheme=scheme, k=k, kind="neighborhood",
                                 prompt_index=j, sentence="S", nll_new=nll_new, nll_true=nll_true, lp1_new=0.0,
                                 lp1_true=0.0, n_new=1, n_true=1, mode_new="joint", mode_true="joint"))
    return pd.DataFrame(rows)


def wins(rate: float, n: int = 20) -> list[int]:
    """n records of which round(rate * n) succeed."""
    m = round(rate * n)
    return [1] * m + [0] * (n - m)


def spec(scheme="generic_false", model="m1", **kw):
    return {"model": model, "dtype": "float32", "scheme": scheme, "relation": None, "id": f"{model}-{scheme}", **kw}


def test_k50_and_auc_by_hand():
    ks = [0, 1, 2, 3]
    assert lb.k50([0.1, 0.4, 0.6, 0.9], ks) == 2
    assert lb.k50([0.5, 0.4], [0, 1]) == 0                          # >= 0.5 counts
    assert lb.k50([0.1, 0.2, 0.3], [0, 1, 5]) is None
    assert lb.k50([0.1, 0.7], [0, 5]) == 5                          # grid values, no interpolation
    # trapezoid: (0.1+0.4)/2 + (0.4+0.6)/2 + (0.6+0.9)/2 = 1.5, over the range 3 -> 0.5
    assert lb.auc([0.1, 0.4, 0.6, 0.9], ks) == pytest.approx(0.5)
    # uneven grid 0,1,5: (0.2+0.6)/2*1 + (0.6+1.0)/2*4 = 3.6, / 5 = 0.72
    assert lb.auc([0.2, 0.6, 1.0], [0, 1, 5]) == pytest.approx(0.72)
    assert lb.auc([1.0] * 4, ks) == pytest.approx(1.0) and lb.auc([0.0] * 4, ks) == 0.0
    assert lb.auc([0.3], [2]) == pytest.approx(0.3)


def test_boot_curves_equal_evaluate_bootstrap():
    rng = np.random.default_rng(0)
    v = (rng.random((37, 4)) < 0.4).astype(float)
    boots = lb.boot_curves(v, n_boot=230, seed=5, block=17)
    m, lo, hi = evaluate.bootstrap_ci(v, n_boot=230, seed=5)
    assert np.allclose(np.quantile(boots, 0.025, axis=0), lo) and np.allclose(np.quantile(boots, 0.975, axis=0), hi)


def test_k50_ci_summary_numbers():
    df = table({0: wins(0.1), 1: wins(0.4), 2: wins(0.6), 3: wins(0.9)})
    s, curve = lb.curve_summary(evaluate.per_record(df, "es"), n_boot=500, seed=1)
    assert s["n"] == 20 and s["kmax"] == 3 and s["k50"] == 2
    assert (s["es_k0"], s["es_k1"], s["es_kmax"]) == pytest.approx((0.1, 0.4, 0.9))
    assert s["auc"] == pytest.approx(0.5) and s["drop"] == pytest.approx(-0.8)
    assert s["k50_lo"] in (1.0, 2.0) and s["k50_hi"] in (2.0, 3.0) and s["k50_lo"] <= 2 <= s["k50_hi"]
    assert s["auc_lo"] < 0.5 < s["auc_hi"]
    assert curve["es"].tolist() == pytest.approx([0.1, 0.4, 0.6, 0.9])
    # the CI by hand: each resample's k50 is the first k whose resampled mean reaches 0.5
    v = evaluate.per_record(df, "es").to_numpy()
    boots = lb.boot_curves(v, 500, 1)
    firsts = sorted(next((k for k in range(4) if b[k] >= 0.5), math.inf) for b in boots)
    assert (s["k50_lo"], s["k50_hi"]) == (firsts[math.ceil(0.025 * 500) - 1], firsts[math.ceil(0.975 * 500) - 1])


def test_k50_never_is_inf_and_shown_as_greater_than_K():
    df = table({0: wins(0.0), 1: wins(0.1), 2: wins(0.45)})
    s, _ = lb.curve_summary(evaluate.per_record(df, "es"), n_boot=300, seed=0)
    assert s["k50"] == math.inf and s["k50_hi"] == math.inf
    board = lb.leaderboard([(spec(), df)], n_boot=300)
    md = to_markdown(board)
    assert ">2 [" in md and "| m1 | generic_false | 20 | 0.000 | 0.100 | 0.450 (K=2) |" in md


def test_reverse_drop_ns_and_control():
    gf = table({0: wins(0.1), 1: wins(0.6), 2: wins(0.8)},
               ns={0: [[(2.0, 1.0), (1.0, 2.0)]] * 10 + [[(2.0, 1.0)]] * 10,       # NS: 0.5 x10, 1 x10
                   2: [[(1.0, 2.0)]] * 20})                                          # NS 0
    gt = table({0: wins(0.3), 1: wins(0.15), 2: wins(0.05)}, scheme="generic_true")
    ctrl = table({0: wins(0.1), 1: wins(0.25), 2: wins(0.3)}, scheme="control_other")
    board = lb.leaderboard([(spec(), gf), (spec("generic_true"), gt), (spec("control_other"), ctrl)], n_boot=200)
    s = board.summary.set_index("scheme")
    assert s.loc["generic_true", "drop"] == pytest.approx(0.25)                       # reverse-hijack drop
    assert s.loc["generic_false", "ns_k0"] == pytest.approx(0.75) and s.loc["generic_false", "ns_kmax"] == 0
    assert s.loc["generic_false", "n_ns"] == 20 and s.loc["generic_true", "n_ns"] == 0
    assert math.isnan(s.loc["generic_true", "ns_k0"])
    assert s.loc["generic_false", "control_es_k1"] == pytest.approx(0.25)
    assert s.loc["generic_false", "control_es_kmax"] == pytest.approx(0.3)
    assert s.loc["generic_false", "specific_k1"] == pytest.approx(0.35)
    assert s.loc["generic_false", "specific_kmax"] == pytest.approx(0.5)
    assert s.loc["generic_false", "specific_kmax_lo"] < 0.5 < s.loc["generic_false", "specific_kmax_hi"]
    assert math.isnan(s.loc["generic_true", "specific_kmax"])
    c = board.curves[board.curves.scheme == "generic_false"].set_index("k")
    assert c["specific"].tolist() == pytest.approx([0.0, 0.35, 0.5])
    assert c["ns"].tolist()[0] == pytest.approx(0.75) and math.isnan(c["ns"][1])
    md = to_markdown(board)
    assert "0.250 / 0.300" in md and "+0.350 / +0.500" in md and "0.750 / 0.000" in md


def test_ns_matches_evaluate_when_it_has_ns():
    gf = table({0: wins(0.5, 4)}, ns={0: [[(2.0, 1.0)], [(1.0, 2.0)], [(2.0, 1.0), (2.0, 1.0)], [(1.0, 3.0)]]})
    ns = lb.ns_per_record(gf)
    assert ns[0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_per_relation_sums_and_entry_choice():
    rel = ["P103"] * 8 + ["P190"] * 5 + [None] * 7
    es = {0: [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
          3: [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1]}
    df = table(es, rel=rel)
    small = table({0: [1, 1], 3: [1, 1]})                           # same key, fewer records: not shown
    board = lb.leaderboard([(spec(), df), (spec(id="small"), small)], n_boot=100)
    assert board.superseded == 1 and len(board.summary) == 1 and board.summary.n[0] == 20
    r = board.relations.set_index("relation_id")
    assert sorted(r.index) == ["P103", "P190", "none"] and r.n.sum() == 20
    for col, k in (("es_k0", 0), ("es_kmax", 3)):
        assert (r[col] * r.n).sum() == pytest.approx(sum(es[k]))      # n-weighted means add up exactly
    assert r.loc["P103", "es_kmax"] == pytest.approx(0.5) and r.loc["P190", "es_kmax"] == pytest.approx(1.0)
    assert r.loc["P190", "es_k0"] == pytest.approx(0.4) and r.loc["P190", "k50"] == 3
    assert r.loc["none", "es_kmax"] == pytest.approx(3 / 7) and r.loc["none", "k50"] == math.inf


def test_write_outputs_and_figure(tmp_path):
    gf = table({0: wins(0.1), 1: wins(0.6), 2: wins(0.8)})
    gt = table({0: wins(0.3), 1: wins(0.15), 2: wins(0.05)}, scheme="generic_true")
    board = lb.leaderboard([(spec(), gf), (spec("generic_true"), gt), (spec(model="m2"), gf)], n_boot=50)
    fig = figure(board.curves)
    assert isinstance(fig, matplotlib.figure.Figure) and len([a for a in fig.axes if a.get_visible()]) == 2
    paths = lb.write(board, tmp_path / "lb")
    names = sorted(p.name for p in paths)
    assert names == sorted(["leaderboard.parquet", "curves.parquet", "relations.parquet", "leaderboard.md",
                            "leaderboard.html", "leaderboard.png", "leaderboard.pdf"])
    back = pd.read_parquet(tmp_path / "lb" / "leaderboard.parquet")
    assert len(back) == 3 and back.k50.tolist()[0] == 1 and "<table" in to_html(board)
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in paths)


def _store_entry(root, eid, spec_, df):
    """An entry as hijack.store writes it: spec.json, table.parquet, done.json."""
    d = root / "scores" / eid
    d.mkdir(parents=True)
    (d / "spec.json").write_text(json.dumps({**spec_, "id": eid}))
    df.to_parquet(d / "table.parquet", index=False)
    (d / "done.json").write_text(json.dumps({"records": int(df.case_id.nunique())}))


def test_cli(tmp_path, capsys):
    from assocmem.cli import main
    root = tmp_path / "store"
    rc = main(["hijack", "leaderboard", "--out", str(root)])
    assert rc == 2 and "holds no finished hijack scores" in capsys.readouterr().err
    _store_entry(root, "a1", spec(), table({0: wins(0.1), 1: wins(0.6), 2: wins(0.8)}))
    _store_entry(root, "b2", spec("control_other"), table({0: wins(0.1), 1: wins(0.2), 2: wins(0.3)},
                                                          scheme="control_other"))
    _store_entry(root, "c3", spec(model="m2"), table({0: wins(0.0), 1: wins(0.2), 2: wins(0.4)}))
    (root / "scores" / "d4").mkdir()                                   # unfinished: ignored
    (root / "scores" / "d4" / "spec.json").write_text(json.dumps(spec(model="m3")))
    rc = main(["hijack", "leaderboard", "--out", str(root), "--n-boot", "50", "--models", "m1"])
    out = capsys.readouterr().out
    assert rc == 0 and "| m1 | generic_false | 20 |" in out and "| m2 " not in out and "m3" not in out
    assert "+0.400 / +0.500" in out and (root / "leaderboard" / "leaderboard.png").exists()
    rc = main(["hijack", "leaderboard", "--out", str(root), "--n-boot", "50", "--json",
               "--dest", str(tmp_path / "d")])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and {r["model"] for r in res["summary"]} == {"m1", "m2"}
    assert [r["k50"] for r in res["summary"] if r["model"] == "m2"] == [None]   # +inf has no JSON form
    rc = main(["hijack", "leaderboard", "--out", str(root), "--models", "nope"])
    assert rc == 2 and "for models nope" in capsys.readouterr().err
