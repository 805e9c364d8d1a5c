"""Prompt lengths against the model's context, checked before scoring without building every prompt.

A hijacked prompt is ``H_k + p`` with ``H_k = (S + sep) * k``; the scored sequence is its tokens plus
the target's. Per record and prompt p the length in tokens is estimated from three tokenisations,

    L(0) = |tok(p)|,   L(k) = |tok(S+sep + p)| + (k - 1) * a   (k >= 1),
    a = |tok((S+sep)*2 + p)| - |tok(S+sep + p)|              (tokens added per repetition),

plus the longest target ``|tok(" " + target)|``. Estimates within a margin of the limit are replaced by
the exact length of the real string (only those few strings are built). Prompts whose UTF-8 byte
length bounds them far below the limit (a token covers at least one byte) are not tokenised at all.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..config import ConfigError
from .counterfact import Record
from .schemes import hijack_prompt

SLACK = 8   # special tokens (BOS, a SentencePiece dummy prefix, ...) a tokenizer may add to a string


def record_prompts(rec: Record, paraphrase: bool = False, neighborhood: bool = False) -> list[str]:
    """The prompts a record is scored on (rewrite, then paraphrases, then neighbourhood prompts)."""
    return ([rec.text] + (list(rec.paraphrase_prompts) if paraphrase else [])
            + (list(rec.neighborhood_prompts) if neighborhood else []))


def _exact(tokenizer, context: str, targets: Sequence[str]) -> int:
    """Tokens of the scored sequence, as the scorer builds it (joint, or context + fallback tail)."""
    ctx = len(tokenizer(context)["input_ids"])
    return max(max(len(tokenizer(context + " " + t)["input_ids"]),
                   ctx + len(tokenizer(" " + t, add_special_tokens=False)["input_ids"])) for t in targets)


def sequence_lengths(tokenizer, rec: Record, sentence: str, ks: Sequence[int], sep: str = " ",
                     paraphrase: bool = False, neighborhood: bool = False, limit: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Longest scored sequence over the record's prompts per k, [len(ks)], and whether each value
    is exact. Exact where the estimate is within a margin of ``limit``; otherwise the estimate (or
    a byte bound that is already far below ``limit``)."""
    ks = np.asarray(ks, dtype=np.int64)
    unit = sentence + sep
    targets = (rec.target_new, rec.target_true)
    t_bytes = max(len((" " + t).encode()) for t in targets)
    best = np.zeros(len(ks), dtype=np.int64)
    exact = np.zeros(len(ks), dtype=bool)

    def take(value: np.ndarray, is_exact: np.ndarray) -> None:
        nonlocal best, exact
        up = value > best
        best, exact = np.where(up, value, best), np.where(up, is_exact, exact)

    todo = []
    for p in record_prompts(rec, paraphrase, neighborhood):
        bound = ks * len(unit.encode()) + len(p.encode()) + t_bytes + SLACK   # >= tokens
        if limit is not None and bound.max() <= limit:
            take(bound, np.zeros(len(ks), dtype=bool))
        else:
            todo.append(p)
    if not todo:
        return best, exact
    t_tok = max(len(tokenizer(" " + t, add_special_tokens=False)["input_ids"]) for t in targets)
    enc = tokenizer(todo + [unit + p for p in todo] + [unit * 2 + p for p in todo])["input_ids"]
    n = len(todo)
    for i, p in enumerate(todo):
        l0, l1, l2 = len(enc[i]), len(enc[n + i]), len(enc[2 * n + i])
        est = np.where(ks == 0, l0, l1 + (ks - 1) * (l2 - l1)) + t_tok
        is_exact = np.zeros(len(ks), dtype=bool)
        if limit is not None:
            for j in np.flatnonzero(np.abs(est - limit) <= 8 + est // 200):
                est[j] = _exact(tokenizer, hijack_prompt(sentence, p, int(ks[j]), sep), targets)
                is_exact[j] = True
        take(est, is_exact)
    return best, exact


def too_long_pairs(tokenizer, records: Sequence[Record], sentences: Mapping[int, str], ks: Sequence[int],
                   limit: int, sep: str = " ", paraphrase: bool = False, neighborhood: bool = False
                   ) -> list[tuple[int, int, int, bool]]:
    """(case_id, k, tokens, exact) for every (record, k) whose longest scored sequence exceeds
    ``limit`` positions, in record order then k. Records without a sentence are ignored."""
    out = []
    for rec in records:
        s = sentences.get(rec.case_id)
        if s is None:
            continue
        lengths, exact = sequence_lengths(tokenizer, rec, s, ks, sep, paraphrase, neighborhood, limit)
        out += [(rec.case_id, int(ks[j]), int(lengths[j]), bool(exact[j])) for j in np.flatnonzero(lengths > limit)]
    return out


def check_lengths(tokenizer, records: Sequence[Record], sentences: Mapping[int, str], ks: Sequence[int],
                  limit: int | None, sep: str = " ", paraphrase: bool = False, neighborhood: bool = False,
                  skip: bool = False, model: str = "the model") -> set[tuple[int, int]]:
    """The (case_id, k) pairs to skip (only with ``skip``); raises :class:`ConfigError` naming the
    first record and k whose prompt does not fit, otherwise. No limit known: nothing is checked."""
    if limit is None:
        return set()
    bad = too_long_pairs(tokenizer, records, sentences, ks, limit, sep, paraphrase, neighborhood)
    if bad and not skip:
        cid, k, n, ex = bad[0]
        recs = {r.case_id: r for r in records}
        if not ex and n <= 4 * limit:   # state the exact length of the pair named
            lengths, _ = sequence_lengths(tokenizer, recs[cid], sentences[cid], [k], sep, paraphrase,
                                          neighborhood, limit=n)
            n, ex = int(lengths[0]), True
        raise ConfigError(f"prompt length: case_id={cid} k={k}: {'' if ex else 'about '}{n} tokens exceed the "
                          f"{limit} positions of {model} ({len(bad)} record-k pairs too long; allowed: smaller "
                          "k, or --skip-too-long to skip and count them)")
    return {(cid, k) for cid, k, _, _ in bad}
