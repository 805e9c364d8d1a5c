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
    scorer = FastScorer(model, tok, batch_tokens=1000, min_width=32)   # small budget: several batches, padding
    fast = scorer.score(reqs)
    assert max_abs_diff(plain, fast) < 1e-4
    assert [[s.mode for s in r] for r in plain] == [[s.mode for s in r] for r in fast]
    assert scorer.stats["forwards"] > 1 and scorer.stats["padded"] > scorer.stats["nodes"]
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


def test_sequence_longer_than_sliding_window_equals_plain():
    """gemma-3 style models get per-layer masks (full and windowed) built by the scorer, so prompts
    longer than the sliding window are scored exactly."""
    tok, model = tiny_tokenizer(bos=True), tiny_model("gemma3")
    model.config.sliding_window = 8
    reqs = hijack_requests(4)
    scorer = FastScorer(model, tok, verify=False)
    assert scorer.per_layer_masks and scorer.window == 8
    fast = scorer.score(reqs)
    assert max(len(tok(r.context)["input_ids"]) for r in reqs) > 3 * 8
    assert max_abs_diff(plain_score(model, tok, reqs), fast) < 1e-4
    model.config.sliding_window = 10_000        # the window matters: without it the scores differ
    assert max_abs_diff(plain_score(model, tok, reqs), fast) > 1e-3


def test_window_without_per_layer_masks_is_refused():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    model.config.sliding_window = 8             # a window the scorer cannot build per layer type
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


# ------------------------------------------------------------------------------ memory-bounded batches

def test_cost_model_by_hand():
    from assocmem.llm.budget import cost_model
    model = tiny_model("llama")                 # hidden 32, intermediate 64, 4 heads, vocab 400, fp32
    cost = cost_model(model, torch.float32, vocab=400)
    assert cost.as_dict() == {"act_bytes": 4 * (6 * 32 + 3 * 64), "mask_bytes": 4 + 2, "score_bytes": 4 * 4,
                              "logit_bytes": 400 * (4 + 8)}
    # 3 rows x 50 tokens, 7 read positions per row
    extra = 3 * 50 * 50 * (6 + 16) + 3 * 7 * 4800
    assert cost.tokens(3, 50, 7) == 150 + -(-extra // 1536)
    model.set_attn_implementation("eager")      # eager keeps an fp32 softmax per head as well
    assert cost_model(model, torch.bfloat16, 400).score_bytes == 4 * (2 * 2 + 4)


def test_default_budget_from_free_memory(monkeypatch):
    from assocmem.llm import budget
    cost = budget.CostModel(act_bytes=1000, mask_bytes=6, score_bytes=16, logit_bytes=4800)
    monkeypatch.setattr(budget, "free_memory_bytes", lambda dev: (40_000_000, "test"))
    assert budget.default_batch_tokens(torch.device("cpu"), cost)[0] == int(0.25 * 40_000_000 / 1000)
    monkeypatch.setattr(budget, "free_memory_bytes", lambda dev: (10**15, "test"))
    assert budget.default_batch_tokens(torch.device("cpu"), cost)[0] == budget.CPU_CAP
    monkeypatch.setattr(budget, "free_memory_bytes", lambda dev: (10, "test"))
    assert budget.default_batch_tokens(torch.device("cpu"), cost)[0] == budget.MIN_BATCH_TOKENS
    monkeypatch.setattr(budget, "free_memory_bytes", lambda dev: (None, "unknown"))
    assert budget.default_batch_tokens(torch.device("cpu"), cost)[0] == budget.UNKNOWN_FREE_TOKENS
    scorer = FastScorer(tiny_model("gpt2"), tiny_tokenizer())
    assert scorer.stats["batch_tokens"] == budget.UNKNOWN_FREE_TOKENS and scorer.stats["budget_source"] == "unknown"


def _oom_above(model, n_tokens, error):
    """Make ``model.forward`` fail like an out-of-memory error whenever a batch holds more than
    ``n_tokens`` tokens; returns the list of batch sizes that ran."""
    real, ran = model.forward, []

    def forward(*a, input_ids=None, **kw):
        if input_ids.numel() > n_tokens:
            raise error
        ran.append(input_ids.numel())
        return real(*a, input_ids=input_ids, **kw)
    model.forward = forward
    return ran


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate... out of memory")])
def test_out_of_memory_halves_the_budget_and_redoes_the_rows(error, caplog):
    tok, model = tiny_tokenizer(bos=True), tiny_model("llama")
    reqs = hijack_requests(4)
    ref = FastScorer(model, tok, batch_tokens=100_000, min_width=32, verify=False)
    want = ref.score(reqs)
    assert ref.stats["forwards"] == 1
    ran = _oom_above(model, 300, error)
    scorer = FastScorer(model, tok, batch_tokens=100_000, min_width=32, verify=False)
    with caplog.at_level("WARNING", logger="assocmem.llm.scoring"):
        got = scorer.score(reqs)
    assert max_abs_diff(want, got) < 1e-6 and all(s is not None for r in got for s in r)
    st = scorer.stats
    assert st["oom_backoffs"] >= 1 and st["batch_tokens"] < st["batch_tokens_initial"] // 2
    assert "batch_tokens halved" in caplog.text
    assert st["forwards"] == len(ran) and max(ran) <= 300
    assert st["nodes"] == ref.stats["nodes"]               # every row scored once: nothing counted twice


def test_out_of_memory_on_a_single_row_is_one_clear_error():
    tok, model = tiny_tokenizer(), tiny_model("gpt2")
    _oom_above(model, 5, torch.OutOfMemoryError("out of memory"))
    with pytest.raises(ConfigError, match="does not fit in the free memory .* even alone"):
        FastScorer(model, tok, verify=False).score(hijack_requests(2))


def test_other_errors_are_not_taken_for_out_of_memory():
    tok, model = tiny_tokenizer(), tiny_model("gpt2")
    _oom_above(model, 0, RuntimeError("shape mismatch"))
    scorer = FastScorer(model, tok, verify=False)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        scorer.score(hijack_requests(2))
    assert scorer.stats["oom_backoffs"] == 0


def test_token_budget_is_an_alias_and_bad_budgets_are_refused():
    tok, model = tiny_tokenizer(), tiny_model("gpt2")
    assert FastScorer(model, tok, token_budget=777).stats["batch_tokens"] == 777
    assert FastScorer(model, tok, token_budget=777).token_budget == 777
    with pytest.raises(ConfigError, match="batch_tokens: 0"):
        FastScorer(model, tok, batch_tokens=0)


def test_eager_attention_and_bf16():
    from assocmem.llm.scoring import SCORER_VERSION
    assert isinstance(SCORER_VERSION, str)
    tok, model = tiny_tokenizer(bos=True), tiny_model("llama")
    reqs = hijack_requests(3)
    model.set_attn_implementation("eager")
    assert max_abs_diff(plain_score(model, tok, reqs), FastScorer(model, tok, min_width=32).score(reqs)) < 1e-4
    model = tiny_model("gemma3").to(torch.bfloat16)     # masks in the model's dtype (finfo(bf16).min)
    fast = FastScorer(model, tok, min_width=32, verify=False).score(reqs)
    plain = plain_score(model, tok, reqs)
    # bf16 rounds differently in a batched forward; the log-probs still agree to bf16 precision
    assert all(np.isfinite(s.logprobs).all() for r in fast for s in r)
    assert max_abs_diff(plain, fast) < 0.05
