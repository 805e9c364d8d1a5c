"""Score hijacked CounterFact prompts and summarise them (ROME's efficacy score and friends).

:func:`score_records` returns a tidy table, one row per (record, k, prompt), with the raw numbers
every summary is computed from::

    case_id relation_id scheme k kind(rewrite|paraphrase|neighborhood) prompt_index sentence
    nll_new nll_true lp1_new lp1_true n_new n_true mode_new mode_true

nll_* is the mean per-token negative log-likelihood of " " + target after the prompt; lp1_* the
log-probability of the target's first token; mode_* the tokenisation route ("joint"/"fallback").
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..llm.scoring import FastScorer, Request, plain_score
from .counterfact import Record
from .schemes import Scheme, hijack_prompt

METRICS = ("es", "es_first", "magnitude", "ps", "ns")
COLUMNS = ("case_id", "relation_id", "scheme", "k", "kind", "prompt_index", "sentence", "nll_new", "nll_true",
           "lp1_new", "lp1_true", "n_new", "n_true", "mode_new", "mode_true")


@dataclasses.dataclass
class Skipped:
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def needs_other(scheme: Scheme) -> bool:
    """Whether the scheme's sentence names another record's false target ({other})."""
    return bool(getattr(scheme, "needs_other", False))


def sentence(scheme: Scheme, rec: Record, countries, others: Mapping[int, str] | None = None
             ) -> tuple[str | None, str]:
    """The scheme's sentence S for ``rec`` ((None, reason) if it does not apply)."""
    if needs_other(scheme):
        return scheme.sentence(rec, countries, other=(others or {}).get(rec.case_id))
    return scheme.sentence(rec, countries)


def build_requests(records: Sequence[Record], scheme: Scheme, ks: Sequence[int], countries, sep: str = " ",
                   paraphrase: bool = False, neighborhood: bool = False, others: Mapping[int, str] | None = None,
                   skip: Collection[tuple[int, int]] = ()) -> tuple[list[Request], list[dict], Skipped]:
    """One request (both targets) per record, k and prompt; rows carry the table's key columns.

    Paraphrase and neighbourhood prompts get the same prefix H_k as the rewrite prompt. ``others``:
    {case_id: other record's target_new} for schemes with {other}; ``skip``: (case_id, k) pairs left out
    (prompts longer than the model's context)."""
    reqs, keys, skipped = [], [], Skipped()
    for rec in records:
        s, why = sentence(scheme, rec, countries, others)
        if s is None:
            skipped.add(why)
            continue
        prompts = [("rewrite", 0, rec.text)]
        if paraphrase:
            prompts += [("paraphrase", i, p) for i, p in enumerate(rec.paraphrase_prompts)]
        if neighborhood:
            prompts += [("neighborhood", i, p) for i, p in enumerate(rec.neighborhood_prompts)]
        for k in ks:
            if (rec.case_id, k) in skip:
                continue
            for kind, idx, p in prompts:
                reqs.append(Request(hijack_prompt(s, p, k, sep), (rec.target_new, rec.target_true),
                                    group=rec.case_id))
                keys.append({"case_id": rec.case_id, "relation_id": rec.relation_id, "scheme": scheme.name,
                             "k": k, "kind": kind, "prompt_index": idx, "sentence": s})
    return reqs, keys, skipped


def score_records(model, tokenizer, records: Sequence[Record], scheme: Scheme, ks: Sequence[int], countries,
                  sep: str = " ", paraphrase: bool = False, method: str = "fast", progress: bool = True,
                  batch_tokens: int | None = None, neighborhood: bool = False,
                  others: Mapping[int, str] | None = None, skip: Collection[tuple[int, int]] = ()
                  ) -> tuple[pd.DataFrame, Skipped]:
    """Score the records' hijacked prompts; the tidy table (columns :data:`COLUMNS`) and the skips.
    ``batch_tokens``: token budget per forward of the fast scorer (None: the scorer's default)."""
    reqs, keys, skipped = build_requests(records, scheme, ks, countries, sep, paraphrase, neighborhood, others, skip)
    if method == "fast":
        params = inspect.signature(FastScorer).parameters
        kw = {} if batch_tokens is None else (
            {"batch_tokens": batch_tokens} if "batch_tokens" in params else {"token_budget": batch_tokens})
        scored = FastScorer(model, tokenizer, **kw).score(reqs, progress=progress) if reqs else []
    elif method == "plain":
        scored = plain_score(model, tokenizer, reqs, progress=progress)
    else:
        from ..config import ConfigError
        raise ConfigError(f"method: {method!r} (allowed: fast, plain)")
    rows = []
    for key, (new, true) in zip(keys, scored):
        rows.append({**key, "nll_new": new.nll, "nll_true": true.nll, "lp1_new": new.first, "lp1_true": true.first,
                     "n_new": new.n, "n_true": true.n, "mode_new": new.mode, "mode_true": true.mode})
    return pd.DataFrame(rows, columns=list(COLUMNS)), skipped


# ----------------------------------------------------------------------------------------- summaries

def per_record(df: pd.DataFrame, metric: str = "es") -> pd.DataFrame:
    """Matrix [case_id x k] of per-record values of ``metric`` (see :data:`METRICS`)."""
    if metric not in METRICS:
        from ..config import ConfigError
        raise ConfigError(f"metric: {metric!r} (allowed: {', '.join(METRICS)})")
    kind = {"ps": "paraphrase", "ns": "neighborhood"}.get(metric, "rewrite")
    d = df[df["kind"] == kind]
    if metric in ("es", "ps"):
        v = (d["nll_new"] < d["nll_true"]).astype(float)
    elif metric == "ns":                                        # ROME: the true target should still win
        v = (d["nll_true"] < d["nll_new"]).astype(float)
    elif metric == "es_first":
        v = (d["lp1_new"] > d["lp1_true"]).astype(float)       # exact ties count as failures
    else:
        v = np.exp(-d["nll_new"]) - np.exp(-d["nll_true"])
    return (d.assign(v=v).groupby(["case_id", "k"])["v"].mean()   # PS/NS: mean over a record's prompts
            .unstack("k").sort_index(axis=1))


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over rows and a percentile bootstrap CI (rows resampled with replacement, paired across
    columns). ``values``: [records, conditions]; NaN-free. Returns (mean, lo, hi) per column."""
    values = np.asarray(values, float)
    if values.ndim == 1:
        values = values[:, None]
    n = values.shape[0]
    mean = values.mean(axis=0)
    if n == 0:
        nan = np.full(values.shape[1], np.nan)
        return nan, nan, nan
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boots = values[idx].mean(axis=1)                                   # [n_boot, conditions]
    a = (1 - level) / 2
    return mean, np.quantile(boots, a, axis=0), np.quantile(boots, 1 - a, axis=0)


def metric_curve(df: pd.DataFrame, metric: str = "es", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Columns k, value, lo, hi, n: the mean of ``metric`` over records with a 95% bootstrap CI."""
    m = per_record(df, metric).dropna()
    if m.empty:
        return pd.DataFrame(columns=["k", "value", "lo", "hi", "n"])
    mean, lo, hi = bootstrap_ci(m.to_numpy(), n_boot=n_boot, seed=seed)
    return pd.DataFrame({"k": m.columns.astype(int), "value": mean, "lo": lo, "hi": hi, "n": len(m)})


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """Write ``df`` to ``path`` atomically (:func:`assocmem.io.atomic_write_parquet`)."""
    from ..io import atomic_write_parquet
    return atomic_write_parquet(df, path)


def tie_rate(df: pd.DataFrame) -> float:
    d = df[df["kind"] == "rewrite"]
    return float((d["lp1_new"] == d["lp1_true"]).mean()) if len(d) else float("nan")
