"""``reproduce hijack`` end to end with a tiny stand-in model: figures named like the paper's, report
written, per-record tables in the results store, reused, and rescored when the data file changes."""
import gzip
import json

import pytest

from assocmem.report import write_report

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow   # 13+ figures (PNG + PDF) three times, CounterFact parsed three times, two lab runs


def test_reproduce_with_tiny_model(shared_data, tmp_path, monkeypatch):
    from assocmem.experiments import hijack as exp
    from assocmem.hijack.store import ScoreStore
    from assocmem.llm import models
    from assocmem.llm.testing import tiny_model, tiny_tokenizer

    calls = []

    def fake_load(name, **kw):
        calls.append((name, kw.get("device"), kw.get("dtype")))
        return models.LoadedModel(name, tiny_model("llama"), tiny_tokenizer(bos=True),
                                  {"model": name, "revision": "tiny-0", "dtype": "float32", "device": "cpu"})

    src = shared_data / "counterfact" / "counterfact.json.gz"
    monkeypatch.setenv("ASSOCMEM_COUNTERFACT", str(src))
    monkeypatch.setattr(models, "load_model", fake_load)
    monkeypatch.setattr(exp, "_available", lambda name: name == "smollm2-135m")
    out = tmp_path / "rep"
    section = exp.reproduce(out, n=3, ks=[0, 1, 2], dtype="float32")
    write_report(section, out)
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"sub_false_accs", "sub_true_accs", "hijack-example"} <= names
    assert {f"sentence_{pol}_P{r}" for pol in ("false", "true") for r in (103, 131, 190, 641, 1412)} <= names
    assert (out / "report.md").exists() and (out / "report.html").exists()
    first = {e.id: e for e in ScoreStore(out).entries()}
    assert len(first) == 12 and {e.spec["model"] for e in first.values()} == {"smollm2-135m"}
    assert all(e.spec["n"] == 3 or e.spec["relation"] for e in first.values())
    checks = {c.name: c for c in section.checks()}
    assert checks["gemma3-270m: not installed"].verdict == "missing"
    assert any(name.startswith("smollm2-135m: sub_false_accs") for name in checks)
    assert calls == [("smollm2-135m", "auto", "float32")]
    # the mechanism lab at quick scale: a stored entry, its figures, and a lens check that is measured
    lab = {f.title: f for f in section.families}["Mechanism lab: smollm2-135m"]
    assert lab.figures and all((out / f).exists() for f in lab.figures)
    assert {c.name: c for c in lab.checks}["smollm2-135m: final-layer lens equals the model's margin"].verdict \
        == "trend holds"
    explained = sorted((out / "explain").glob("smollm2-135m-*/done.json"))
    assert len(explained) == 1

    # same data: every curve is reused (the model is loaded once, for its identity and the demo)
    calls.clear()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "scores").rglob("table.parquet")}
    mtimes_lab = explained[0].stat().st_mtime_ns
    exp.reproduce(out, n=3, ks=[0, 1, 2], dtype="float32")
    assert len(calls) == 1 and {e.id for e in ScoreStore(out).entries()} == set(first)
    assert sorted((out / "explain").glob("smollm2-135m-*/done.json")) == explained
    assert explained[0].stat().st_mtime_ns == mtimes_lab
    assert {p: p.stat().st_mtime_ns for p in (out / "scores").rglob("table.parquet")} == mtimes

    # another data file (same records, two targets changed): new entries, old ones untouched
    raw = json.loads(gzip.open(src, "rt").read())
    for r in raw:
        r["requested_rewrite"]["target_new"]["str"] = "Klingon"
    other = tmp_path / "cf-other.json"
    other.write_text(json.dumps(raw))
    monkeypatch.setenv("ASSOCMEM_COUNTERFACT", str(other))
    write_report(exp.reproduce(out, n=3, ks=[0, 1, 2], dtype="float32"), out)
    entries = ScoreStore(out).entries()
    assert len(entries) == 24 and set(first) < {e.id for e in entries}
    new = [e for e in entries if e.id not in first]
    assert {e.spec["data"] for e in new} == {str(other)}
    assert all(set(e.table()["sentence"]) <= {"Do not think of Klingon."} for e in new
               if e.spec["scheme"] == "generic_false")
    assert {p: p.stat().st_mtime_ns for p in (out / "scores").rglob("table.parquet") if p in mtimes} == mtimes
    assert "cf-other.json" in (out / "report.md").read_text()
    assert len(list((out / "explain").glob("smollm2-135m-*/done.json"))) == 2    # new data: explained again
