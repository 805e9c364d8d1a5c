"""Mechanism lab on tiny random models of every supported family: DLA parts sum to the model's own
margin, the final-layer logit lens is the model's margin, patching from a cached prefix equals full runs,
ablating nothing is the baseline, and the whole pipeline + CLI run end to end."""
import numpy as np
import pytest
import torch

from assocmem.hijack import explain as X
from assocmem.hijack import explain_patch as P
from assocmem.hijack import testing
from assocmem.hijack.counterfact import parse_records
from assocmem.hijack.schemes import load_schemes
from assocmem.llm import hooks
from assocmem.llm.testing import tiny_model, tiny_tokenizer

KINDS = ["gpt2", "llama", "gemma3", "qwen2"]


def setup(kind, ks=(0, 2)):
    from tests.test_llm_hooks import qwen2_tiny
    m = qwen2_tiny() if kind == "qwen2" else tiny_model(kind)
    tok = tiny_tokenizer(bos=kind != "gpt2")
    book = load_schemes()
    recs = parse_records(testing.records()).records
    lab = X.Lab(m, tok)
    prompts, _ = X.build_prompts(tok, recs, book.get("generic_false"), book.countries, ks)
    traces = X.run_traces(lab, prompts)
    return lab, recs, book, {(t.prompt.case_id, t.prompt.k): t for t in traces}


@pytest.mark.parametrize("kind", KINDS)
def test_dla_parts_sum_to_the_margin_and_lens_ends_at_it(kind):
    lab, _, _, tr = setup(kind)
    d = X.dla(list(tr.values()))
    s = d.groupby(["case_id", "k"]).agg(total=("value", "sum"), m=("margin_raw", "first"))
    assert np.abs(s.total - s.m).max() < 1e-4
    for t in tr.values():
        with torch.no_grad():
            logits = lab.model(lab.ids(t.prompt.text)).logits[0, -1]
        lp = torch.log_softmax(logits, -1)
        assert abs(t.margin - float(lp[t.prompt.new_id] - lp[t.prompt.true_id])) < 1e-5
        assert abs(t.lens[-1] - t.margin) < 1e-4          # last layer through final norm (+ soft-cap)
    if kind == "gemma3":                                   # the tiny gemma has a final logit soft-cap
        assert any(abs(t.margin - t.margin_raw) > 1e-6 for t in tr.values())


def test_cue_positions_cover_the_target_word_in_every_copy():
    lab, recs, book, tr = setup("llama", ks=(0, 3))
    p = tr[(0, 3)].prompt
    pos = X.cue_positions(lab.tok, p)
    ids = lab.tok(p.text)["input_ids"]
    text = lab.tok.decode([ids[i] for i in pos])
    assert text.replace(" ", "") == "English" * 3
    assert X.cue_positions(lab.tok, tr[(0, 0)].prompt) == []


@pytest.mark.parametrize("kind", KINDS)
def test_patching_from_the_cached_prefix_matches_full_runs(kind):
    lab, _, _, tr = setup(kind)
    clean, hij = tr[(0, 0)], tr[(0, 2)]
    comps = P.components(lab)
    mp = P.patched_margins(lab, clean.prompt, hij, comps, chunk=5)
    # patching the last layer's residual reproduces the source run's margin
    assert abs(mp[-1] - hij.margin) < 1e-4
    # patching a run into itself changes nothing
    assert np.abs(P.patched_margins(lab, clean.prompt, clean, comps) - clean.margin).max() < 1e-4
    # one head, checked against a full (uncached) run with the hook
    j = 1
    kind_, layer, head = comps[j]
    with torch.no_grad(), hooks.patch_heads(lab.model, [(layer, head)], hij.z):
        logits = lab.model(lab.ids(clean.prompt.text)).logits[0, -1]
    assert abs(float(logits[clean.prompt.new_id] - logits[clean.prompt.true_id]) - mp[j]) < 1e-4


def test_ablating_nothing_is_the_baseline_and_pipeline_runs():
    lab, recs, book, tr = setup("gpt2")
    sch = book.get("generic_false")
    means = P.head_means([tr[(c, 0)] for c in (0, 1, 2)])
    ab = P.ablation(lab, recs[3:], sch, book.countries, [0, 1], " ", [(0, 1), (1, 2)], means, hs=(0, 1, 2),
                    neutral=None)
    from assocmem.hijack.evaluate import per_record, score_records
    df, _ = score_records(lab.model, lab.tok, recs[3:], sch, [0, 1], book.countries, progress=False)
    base = per_record(df, "es").mean()
    got = ab[ab.h == 0].set_index("k")["es"]
    assert np.allclose(got.to_numpy(), base.to_numpy())
    assert set(ab.h) == {0, 1, 2}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_analyse_and_report_families(kind, tmp_path):
    from assocmem.hijack import explain_report as R
    from tests.test_llm_hooks import qwen2_tiny  # noqa: F401
    m = tiny_model(kind)
    tok = tiny_tokenizer(bos=True)
    book = load_schemes()
    recs = parse_records(testing.records()).records
    t = R.analyse(m, tok, recs, book.get("generic_false"), book.countries, [0, 1, 2], hs=(1, 2), n_patch=2,
                  neutral_path=None)
    assert t["splits"]["select"] + t["splits"]["eval"] == 7
    fams = R.families(t, tmp_path / "figures", kind)
    assert fams and all((tmp_path / f).exists() for f in fams[0].figures)
    s = R.summary(t)
    assert set(s["ablation"]) == {0, 1, 2}


def test_cli_explain_writes_tables_figures_and_report(tmp_path):
    import json

    from assocmem.cli import main
    m = tiny_model("llama")
    tok = tiny_tokenizer(bos=True)
    m.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(testing.records()))
    out = tmp_path / "out"
    rc = main(["hijack", "explain", "--model", str(tmp_path / "model"), "--data", str(data), "--n", "7",
               "--k", "0..2", "--ablate", "1,2", "--n-patch", "2", "--neutral", "none", "--out", str(out), "--json"])
    assert rc == 0
    assert (out / "report.md").exists() and (out / "tables" / "dla.parquet").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["splits"]["select"] + s["splits"]["eval"] == 7


def test_cli_explain_bad_input_is_one_line_error(tmp_path, capsys):
    from assocmem.cli import main
    rc = main(["hijack", "explain", "--select-frac", "1.5", "--out", str(tmp_path)])
    assert rc == 2
    assert "select-frac" in capsys.readouterr().err
