"""``reproduce hijack`` end to end with a tiny stand-in model: figures named like the paper's, report
written, per-record tables cached and reused."""
import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow   # ~15 s CPU: 13 figures (PNG + PDF), CounterFact parsed twice


def test_reproduce_with_tiny_model(shared_data, tmp_path, monkeypatch):
    from assocmem.experiments import hijack as exp
    from assocmem.llm import models
    from assocmem.llm.testing import tiny_model, tiny_tokenizer

    calls = []

    def fake_load(name, **kw):
        calls.append(name)
        return models.LoadedModel(name, tiny_model("llama"), tiny_tokenizer(bos=True), {"model": name})

    monkeypatch.setenv("ASSOCMEM_COUNTERFACT", str(shared_data / "counterfact" / "counterfact.json.gz"))
    monkeypatch.setattr(models, "load_model", fake_load)
    monkeypatch.setattr(exp, "_available", lambda name: name == "smollm2-135m")
    section = exp.reproduce(tmp_path, n=3, ks=[0, 1, 2])
    names = {p.stem for p in (tmp_path / "figures").glob("*.png")}
    assert {"sub_false_accs", "sub_true_accs", "hijack-example"} <= names
    assert {f"sentence_{pol}_P{r}" for pol in ("false", "true") for r in (103, 131, 190, 641, 1412)} <= names
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.html").exists()
    assert len(list((tmp_path / "scores" / "smollm2-135m").glob("*.parquet"))) == 12
    checks = {c.name: c for c in section.checks()}
    assert checks["gemma3-270m: not installed"].verdict == "missing"
    assert any(name.startswith("smollm2-135m: sub_false_accs") for name in checks)
    calls.clear()
    exp.reproduce(tmp_path, n=3, ks=[0, 1, 2])           # cached: loads the model only for the demo
    assert calls == ["smollm2-135m"]
