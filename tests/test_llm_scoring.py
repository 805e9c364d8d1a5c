"""The continuation scorer: ROME's NLL on hand-computed logits, tokenisation routes, and the fast
trie-batched path equal to the plain one-sequence-at-a-time loop."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from assocmem.config import ConfigError  # noqa: E402
from assocmem.llm.scoring import FastScorer, Request, encode, fast_score, max_abs_diff, plain_score  # noqa: E402
from assocmem.llm.testing import tiny_model, tiny_tokenizer  # noqa: E402

WORDS = ["<pad>", "<s>", "the", "tongue", "is", "French", "English", "not", "Do", "think", "of", "."]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


class Bigram(torch.nn.Module):
    """A stub LM whose logits at each position are a fixed row of a table indexed by that position's
    token (so the hand calculation needs nothing but the table)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))
        self.config = type("Cfg", (), {})()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


def test_nll_matches_hand_computation_two_token_target():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(WORDS), len(WORDS))) * 3
    tok = word_tokenizer()
    ix = {w: i for i, w in enumerate(WORDS)}
    req = [Request("the tongue is", ("French .", "English")), Request("Do not think", ("of English",))]

    def lsm(row):
        return row - np.log(np.exp(row).sum())

    hand = [[[lsm(table[ix["is"]])[ix["French"]], lsm(table[ix["French"]])[ix["."]]],
             [lsm(table[ix["is"]])[ix["English"]]]],
            [[lsm(table[ix["think"]])[ix["of"]], lsm(table[ix["of"]])[ix["English"]]]]]
    for result in (plain_score(Bigram(table), tok, req), fast_score(Bigram(table), tok, req)):
        for got_row, want_row in zip(result, hand):
            for got, want in zip(got_row, want_row):
                np.testing.assert_allclose(got.logprobs, want, atol=1e-6)
                assert got.nll == pytest.approx(-np.mean(want), abs=1e-6)   # mean, not sum
                assert got.first == pytest.approx(want[0], abs=1e-6)


def test_joint_tokenisation_equals_rome_on_byte_level_bpe():
    tok = tiny_tokenizer()
    for p, a in [("The mother tongue of Danielle Darrieux is", "English"), ("Do not think of", "Chicago"),
                 ("The twin city of Lyon is", "Beirut")]:
        ctx, tgt, mode = encode(tok, p, a)
        assert mode == "joint"
        assert ctx == tok(p)["input_ids"]
        assert tgt == tok(" " + a, add_special_tokens=False)["input_ids"]   # ROME's target ids
        assert tok.decode(tgt) == " " + a


def test_fallback_recorded_when_context_ids_are_not_a_prefix():
    from tokenizers import processors
    tok = tiny_tokenizer()
    eos = tok.convert_tokens_to_ids("</s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    ctx, tgt, mode = encode(tok, "Do not think of", "English")
    assert mode == "fallback" and ctx[-1] == eos
    assert tgt == tok(" English", add_special_tokens=False)["input_ids"]


def hijack_requests(n_k=4):
    facts = [("Do not think of English.", "The mother tongue of Danielle Darrieux is", "English", "French"),
             ("The twin city of Lyon is not Manila.", "What is the twin city of Lyon? It is", "Manila", "Beirut"),
             ("Do not think of Chicago.", "The Eiffel Tower is in the city of", "Chicago", "Paris"),
             ("Toko Yasuda is not from Germany.", "Toko Yasuda speaks the language", "German", "Germanic"),
             ("x", "Paris", "France", "France")]     # short prompt; identical targets
    return [Request((s + " ") * k + p, (a, b), group=i) for i, (s, p, a, b) in enumerate(facts) for k in range(n_k)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("bos", [False, True])
def test_fast_equals_plain_loop(kind, bos):
    tok, model = tiny_tokenizer(bos=bos), tiny_model(kind)
    reqs = hijack_requests()
    plain = plain_score(model, tok, reqs)
    scorer = FastScorer(model, tok, token_budget=300)          # small budget: several batches, padding
    fast = scorer.score(reqs)
    assert max_abs_diff(plain, fast) < 1e-4
    assert [[s.mode for s in r] for r in plain] == [[s.mode for s in r] for r in fast]
    assert scorer.stats["forwards"] > 1
    # prefix sharing: the tries hold fewer tokens than the sequences they encode
    total = sum(len(tok(r.context + " " + t)["input_ids"]) for r in reqs for t in r.targets)
    assert scorer.stats["nodes"] < 0.6 * total


def test_grouping_does_not_change_scores():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    reqs = hijack_requests(3)
    ungrouped = [Request(r.context, r.targets) for r in reqs]
    assert max_abs_diff(fast_score(model, tok, reqs), fast_score(model, tok, ungrouped)) < 1e-4
    unpacked = FastScorer(model, tok, pack=False)
    assert max_abs_diff(fast_score(model, tok, reqs), unpacked.score(reqs)) < 1e-4
    packed = FastScorer(model, tok, min_width=10_000)            # everything in one row
    assert max_abs_diff(packed.score(reqs), unpacked.score(reqs)) < 1e-4 and packed.stats["forwards"] == 1


def test_sequence_longer_than_sliding_window_is_refused():
    tok, model = tiny_tokenizer(), tiny_model("gemma3")
    model.config.sliding_window = 8
    with pytest.raises(ConfigError, match="sliding window"):
        fast_score(model, tok, [Request("Do not think of English. " * 3 + "The mother tongue is", ("French",))])


def test_verification_catches_a_model_that_ignores_the_tree_mask():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    reqs = hijack_requests(3)
    broken = FastScorer(model, tok)
    broken._forward_ok = broken._forward

    def ignore_mask(batch, out):            # simulate an attention backend that drops custom masks
        real = model.forward

        def fwd(*a, attention_mask=None, **kw):
            return real(*a, attention_mask=None, **kw)
        model.forward = fwd
        try:
            broken._forward_ok(batch, out)
        finally:
            del model.forward
    broken._forward = ignore_mask
    with pytest.raises(RuntimeError, match="disagrees with the plain loop"):
        broken.score(reqs)
    assert FastScorer(model, tok).score(reqs) and model._assocmem_fast_verified
