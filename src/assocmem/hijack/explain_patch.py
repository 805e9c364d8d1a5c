"""Causal analyses of hijacking: activation patching, mean-ablation as a defence, the OV-circuit
(associative-memory) reading of the top heads and the concept-level control.

* Patching is done at the **last prompt position only**: the clean (k = 0) and hijacked (k = K) prompts
  have different lengths, so only the final position (the same prompt token in both) has a counterpart.
  Earlier positions cannot change the final position's output except through attention, so the prompt
  minus its last token is run once and cached, and every component's patched run is one batched
  last-token step from that cache (exact: tested against full runs through "patch nothing" and
  "patch the last residual"). fraction moved = sum_r (m_patched - m_target) / sum_r (m_source - m_target).
* Ablation replaces a head's output by its mean over the **clean (k = 0) prompts' last positions of the
  selection split**, at every position, on held-out records; ES is the scorer's multi-token ROME score.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..llm import hooks
from .counterfact import Record
from .explain import Lab, Prompt, Trace, first_token
from .schemes import Scheme, hijack_prompt


def _cache_kw() -> str:
    import inspect

    from transformers import LlamaModel
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


_CACHE_KW = "past_key_values"


def components(lab: Lab) -> list[tuple[str, int, int]]:
    """("head", l, h) for every head, then ("resid", l, -1) for every layer output."""
    return [("head", i, h) for i in range(lab.L) for h in range(lab.H)] + [("resid", i, -1) for i in range(lab.L)]


@torch.no_grad()
def patched_margins(lab: Lab, target: Prompt, source: Trace, comps: Sequence[tuple[str, int, int]],
                    chunk: int = 64) -> np.ndarray:
    """Margin of ``target`` with each component's last-position value set to ``source``'s (one per comp)."""
    global _CACHE_KW
    _CACHE_KW = _cache_kw()
    m = lab.model
    ids = lab.ids(target.text)
    pre = m(ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
    src_z, src_res = source.z, source.resid
    out = []
    for c0 in range(0, len(comps), chunk):
        part = comps[c0:c0 + chunk]
        heads_at: dict[int, list[tuple[int, int]]] = {}
        res_at: dict[int, list[int]] = {}
        for r, (kind, i, h) in enumerate(part):
            (heads_at.setdefault(i, []).append((r, h)) if kind == "head" else res_at.setdefault(i, []).append(r))

        def zfn(layer, z):
            for r, h in heads_at.get(layer, ()):
                z[r, -1, h] = src_z[layer, h].to(z.dtype)
            return z

        def make():
            hs = []
            for i, rows in res_at.items():
                def hook(mod, a, o, rows=rows, i=i):
                    x = (o[0] if isinstance(o, tuple) else o).clone()
                    x[rows, -1] = src_res[i + 1].to(x.dtype)
                    return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x
                hs.append(hooks.layers(m)[i].register_forward_hook(hook))
            return hs

        cache = copy.deepcopy(pre)
        cache.batch_repeat_interleave(len(part))
        with hooks.edit_heads(m, zfn), hooks.hooked(make):
            logits = m(ids[:, -1:].expand(len(part), 1), **{_CACHE_KW: cache}, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        out.append((logits[:, target.new_id] - logits[:, target.true_id]).float().cpu().numpy())
    return np.concatenate(out)


def patching(lab: Lab, traces: dict[tuple[int, int], Trace], case_ids: Sequence[int], K: int,
             progress: bool = False) -> pd.DataFrame:
    """Tidy: case_id direction component layer head m_patched m_target m_source, for both directions
    ("to_hijacked": clean run, source k = K; "to_clean": hijacked run, source k = 0)."""
    comps = components(lab)
    rows = []
    it = list(case_ids)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="patching", leave=False)
    for cid in it:
        clean, hij = traces.get((cid, 0)), traces.get((cid, K))
        if clean is None or hij is None:
            continue
        for direction, tgt, src in (("to_hijacked", clean, hij), ("to_clean", hij, clean)):
            mp = patched_margins(lab, tgt.prompt, src, comps)
            for (kind, i, h), v in zip(comps, mp):
                rows.append({"case_id": cid, "direction": direction, "component": kind, "layer": i, "head": h,
                             "m_patched": float(v), "m_target": tgt.margin, "m_source": src.margin})
    return pd.DataFrame(rows)


def patch_ranking(p: pd.DataFrame) -> pd.DataFrame:
    """Per (direction, component, layer, head): fraction of the margin moved (ratio of sums over records),
    sorted by it within each direction."""
    g = p.assign(num=p.m_patched - p.m_target, den=p.m_source - p.m_target).groupby(
        ["direction", "component", "layer", "head"])[["num", "den"]].sum()
    g["frac"] = g["num"] / g["den"]
    return (g.reset_index().sort_values(["direction", "frac"], ascending=[True, False])
            .reset_index(drop=True)[["direction", "component", "layer", "head", "frac"]])


def top_heads(rank: pd.DataFrame, n: int, direction: str = "to_clean") -> list[tuple[int, int]]:
    """The n heads that move most of the margin back when patched from the clean run (default)."""
    r = rank[(rank.direction == direction) & (rank.component == "head")]
    return [(int(a), int(b)) for a, b in zip(r["layer"][:n], r["head"][:n])]


def head_means(traces: Sequence[Trace]) -> torch.Tensor:
    """[L, H, D] mean last-position head output over the given (clean, selection-split) traces."""
    return torch.stack([t.z for t in traces]).mean(0)


def neutral_ids(tok, path: str | Path | None, n_tokens: int = 256) -> torch.Tensor | None:
    """The first ``n_tokens`` tokens of a neutral text (a tiny-Shakespeare slice), or None if absent."""
    if path is None or not Path(path).exists():
        return None
    text = Path(path).read_text(encoding="utf-8")[: n_tokens * 8]
    return torch.tensor([tok(text)["input_ids"][:n_tokens]])


@torch.no_grad()
def ablation(lab: Lab, records: Sequence[Record], scheme: Scheme, countries, ks: Sequence[int], sep: str,
             ranked: Sequence[tuple[int, int]], means: torch.Tensor, hs: Sequence[int] = (0, 1, 2, 4, 8),
             neutral: torch.Tensor | None = None) -> pd.DataFrame:
    """Tidy: h k es es_first n neutral_loss: ES on ``records`` with the top-h heads of ``ranked``
    mean-ablated (h = 0: the unablated baseline), and next-token loss on the neutral text."""
    from .evaluate import per_record, score_records
    rows = []
    for h in hs:
        with hooks.ablate_heads(lab.model, list(ranked[:h]), means):
            df, _ = score_records(lab.model, lab.tok, records, scheme, ks, countries, sep=sep, progress=False)
            loss = float("nan")
            if neutral is not None:
                ids = neutral.to(next(lab.model.parameters()).device)
                loss = float(lab.model(ids, labels=ids).loss)
        es, first = per_record(df, "es").mean(), per_record(df, "es_first").mean()
        for k in es.index:
            rows.append({"h": int(h), "heads": ";".join(f"L{a}H{b}" for a, b in ranked[:h]), "k": int(k),
                         "es": float(es[k]), "es_first": float(first[k]), "n": int(df.case_id.nunique()),
                         "neutral_loss": loss})
    return pd.DataFrame(rows)


@torch.no_grad()
def ov_copying(lab: Lab, heads: Sequence[tuple[int, int]], records: Sequence[Record], pool: Sequence[Record],
               chunk: int = 16) -> pd.DataFrame:
    """Where each head's OV circuit sends a target token: x = its embedding through the layer's input norm,
    o = x W_V[h] W_O[h] (Gemma: through the post-attention norm), logits = unembed(final_norm(o)).

    Tidy: layer head case_id rank_self rank_relation n_vocab. rank_self: tokens scoring above the target's
    own first token (0 = top); rank_relation: median rank of the first tokens of the other answers
    (target_new/target_true) of the same relation in ``pool``."""
    m, a = lab.model, lab.arch
    by_rel: dict[str | None, set[int]] = {}
    for r in pool:
        by_rel.setdefault(r.relation_id, set()).update(
            {first_token(lab.tok, r.text, r.target_new), first_token(lab.tok, r.text, r.target_true)})
    emb = hooks.get(m, a.embed)
    rows = []
    for layer, head in heads:
        ly = hooks.layers(m)[layer]
        W_V, W_O = hooks.head_W_V(m, layer)[head].float(), lab.W_O[layer, head]
        for c0 in range(0, len(records), chunk):
            recs = records[c0:c0 + chunk]
            own = [first_token(lab.tok, r.text, r.target_new) for r in recs]
            dev = next(m.parameters()).device
            x = hooks.get(ly, a.input_norm)(emb(torch.tensor(own, device=dev))).float()
            o = x @ W_V @ W_O                                            # value/output biases left out

            if a.post_attn_norm:
                o = hooks.get(ly, a.post_attn_norm)(o)
            logits = lab.norm(o) @ lab.W_U.T                             # [n, V]
            for r, t, lg in zip(recs, own, logits):
                others = sorted(by_rel.get(r.relation_id, set()) - {t, first_token(lab.tok, r.text, r.target_true)})
                ranks = (lg[None, :] > lg[others][:, None]).sum(1).cpu().numpy() if others else np.array([np.nan])
                rows.append({"layer": layer, "head": head, "case_id": r.case_id,
                             "rank_self": int((lg > lg[t]).sum()), "rank_relation": float(np.median(ranks)),
                             "n_vocab": int(lg.shape[0])})
    return pd.DataFrame(rows)


@torch.no_grad()
def concept_control(lab: Lab, records: Sequence[Record], pool: Sequence[Record], K: int, sep: str = " ",
                    seed: int = 0, template: str = "Do not think of {}.") -> pd.DataFrame:
    """Prepend a sentence naming a *different* answer of the same relation (another record's target_new)
    K times; first-token log-prob changes from k = 0 to k = K of that named answer (d_other), of the
    record's own, unnamed target_new (d_new: a same-relation neighbour) and of target_true (d_true).
    Tidy: case_id relation_id other d_other d_new d_true."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in records:
        if r.relation_id is None:
            continue
        cands = sorted({o.target_new for o in pool if o.relation_id == r.relation_id}
                       - {r.target_new, r.target_true})
        ids = {n: first_token(lab.tok, r.text, n) for n in [r.target_new, r.target_true, *cands]}
        cands = [c for c in cands if ids[c] not in (ids[r.target_new], ids[r.target_true])]
        if not cands or ids[r.target_new] == ids[r.target_true]:
            continue
        other = cands[int(rng.integers(len(cands)))]
        lps = []
        for k in (0, K):
            logits = lab.model(lab.ids(hijack_prompt(template.format(other), r.text, k, sep)),
                                logits_to_keep=1).logits[0, -1]
            lps.append(torch.log_softmax(logits.float(), -1))
        d = lps[1] - lps[0]
        rows.append({"case_id": r.case_id, "relation_id": r.relation_id, "other": other,
                     "d_other": float(d[ids[other]]), "d_new": float(d[ids[r.target_new]]),
                     "d_true": float(d[ids[r.target_true]])})
    return pd.DataFrame(rows)
