"""Why a model is hijacked: logit lens, attention to the cue and direct logit attribution, read through
hooks (:mod:`assocmem.llm.hooks`) from one forward pass per (record, k).

Conventions (one record, hijacked prompt p_k = (S + sep) * k + prompt):

* **margin** m = log p(a_new) - log p(a_true) at the last prompt position, where a_x is the *first token*
  of the continuation " " + target (tokenised as the scorer does, :func:`assocmem.llm.scoring.encode`).
  The first token is the only one read at the prompt's last position, so every analysis is one forward
  pass; the multi-token ROME score is used where ES is reported (ablation). Records whose two targets
  share their first token are dropped (m = 0 always) and counted.
* The log-softmax normaliser cancels in m, so m = l_new - l_true (logits); with final logit
  soft-capping (Gemma-2 style, ``final_logit_softcapping``) m = c*tanh(l_new/c) - c*tanh(l_true/c).
  The logit lens applies the cap (it is exact); direct logit attribution decomposes the *pre-cap* logit
  difference ``margin_raw`` (the cap is not linear); both bundled models have no cap, so there
  margin_raw = margin.
* Logit lens: layer l's residual at the last position through the model's own final norm and
  unembedding (layer 0 = the embeddings; the last layer reproduces the model's margin).
* Attention to the cue: attention weight from the last prompt position onto the tokens overlapping the
  target word's characters inside each prepended sentence (located with the tokenizer's offsets),
  summed over those tokens, per layer and head.
* DLA: the final residual is embeddings + sum over layers of (attention write + MLP write); with the
  final norm's scale frozen at the run's value the logit difference is linear in these parts. Heads:
  z_h W_O[h]; GPT-2's c_proj bias is its own part ("attn_bias"); Gemma-3 normalises the attention
  output before adding it (post_attention_layernorm), so its per-head parts use that norm's scale frozen
  at the run's value too. The parts sum to margin_raw exactly (tested to 1e-4).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..llm import hooks
from ..llm.scoring import encode
from .counterfact import Record
from .schemes import Scheme, hijack_prompt


@dataclasses.dataclass(frozen=True)
class Prompt:
    case_id: int
    relation_id: str | None
    k: int
    text: str
    cue_spans: tuple[tuple[int, int], ...]   # character spans of the target word in the prepended sentences
    new_id: int                               # first token of " " + target_new
    true_id: int                              # first token of " " + target_true


def first_token(tok, context: str, target: str) -> int:
    return encode(tok, context, target)[1][0]


def cue_spans(sentence: str, word: str, k: int, sep: str) -> tuple[tuple[int, int], ...]:
    """Character spans of ``word`` (whole word, any case) in the k prepended copies of ``sentence``."""
    step = len(sentence) + len(sep)
    hits = [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(word) + r"(?!\w)", sentence, re.I)]
    return tuple((i * step + a, i * step + b) for i in range(k) for a, b in hits)


def build_prompts(tok, records: Sequence[Record], scheme: Scheme, countries, ks: Sequence[int], sep: str = " "
                  ) -> tuple[list[Prompt], dict[str, int]]:
    """Prompts for every record the scheme applies to and every k; also counts of skipped records."""
    out, skipped = [], {}
    for rec in records:
        s, why = scheme.sentence(rec, countries)
        if s is None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        cue = rec.target_new if scheme.target == "new" else rec.target_true
        if not cue_spans(s, cue, 1, sep) and countries.get(cue):
            cue = countries[cue]                     # e.g. "is not from {country}"
        ids = [first_token(tok, rec.text, rec.target_new), first_token(tok, rec.text, rec.target_true)]
        if ids[0] == ids[1]:
            skipped["targets share their first token"] = skipped.get("targets share their first token", 0) + 1
            continue
        for k in ks:
            out.append(Prompt(rec.case_id, rec.relation_id, int(k), hijack_prompt(s, rec.text, k, sep),
                              cue_spans(s, cue, k, sep), ids[0], ids[1]))
    return out, skipped


def cue_positions(tok, p: Prompt) -> list[int]:
    enc = tok(p.text, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and any(a < e and b > s
                                                                                for s, e in p.cue_spans)]


def _softcap(model, x: torch.Tensor) -> torch.Tensor:
    c = getattr(model.config, "final_logit_softcapping", None)
    return x if not c else c * torch.tanh(x / c)


@dataclasses.dataclass
class Trace:
    """Last-position readings of one prompt. Shapes: lens [L+1], cue [L, H], heads [L, H], mlp [L],
    attn_bias [L], z [L, H, D], resid [L+1, d]."""
    prompt: Prompt
    margin: float
    margin_raw: float
    lens: np.ndarray
    cue: np.ndarray
    heads: np.ndarray
    mlp: np.ndarray
    attn_bias: np.ndarray
    embed: float
    const: float
    z: torch.Tensor
    resid: torch.Tensor


class Lab:
    """A model prepared for the analyses: eager attention, weights split by head."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        hooks.use_eager(model)
        self.arch = hooks.arch_of(model)
        self.L, self.H, self.D = hooks.dims(model)
        self.W_O = torch.stack([hooks.head_W_O(model, i).float() for i in range(self.L)])   # [L, H, D, d]
        self.b_O = [hooks.o_bias(model, i) for i in range(self.L)]
        self.W_U = hooks.get(model, self.arch.unembed).weight.detach().float()               # [V, d]
        ub = getattr(hooks.get(model, self.arch.unembed), "bias", None)
        self.b_U = None if ub is None else ub.detach().float()
        self.norm = hooks.get(model, self.arch.norm)

    def ids(self, text: str) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return torch.tensor([self.tok(text)["input_ids"]], device=dev)

    @torch.no_grad()
    def trace(self, p: Prompt) -> Trace:
        m = self.model
        with hooks.capture(m, positions=-1) as c:
            logits = m(self.ids(p.text), logits_to_keep=1).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        margin = float(lp[p.new_id] - lp[p.true_id])
        raw = c["logits_raw"][0, -1].float()
        margin_raw = float(raw[p.new_id] - raw[p.true_id])
        u = self.W_U[p.new_id] - self.W_U[p.true_id]
        resid = c["resid"][:, 0, 0].float()                                   # [L+1, d]
        lens_logits = self.norm(resid.to(self.W_U.dtype)).float() @ self.W_U[[p.new_id, p.true_id]].T
        if self.b_U is not None:
            lens_logits = lens_logits + self.b_U[[p.new_id, p.true_id]]
        lens_logits = _softcap(m, lens_logits)
        lens = (lens_logits[:, 0] - lens_logits[:, 1]).cpu().numpy()
        pos = cue_positions(self.tok, p)
        pat = c["pattern"][:, 0, :, 0, :].float()                             # [L, H, T]
        cue = pat[:, :, pos].sum(-1).cpu().numpy() if pos else np.full((self.L, self.H), np.nan)
        w, const = hooks.frozen_final_direction(m, c["final_in"][0, 0], u)
        if self.b_U is not None:
            const += float(self.b_U[p.new_id] - self.b_U[p.true_id])
        z = c["z"][:, 0, 0].float()                                           # [L, H, D]
        writes = torch.einsum("lhD,lhDd->lhd", z, self.W_O)                   # [L, H, d]
        bias = torch.zeros(self.L)
        if self.arch.post_attn_norm:                                          # Gemma: frozen post-norm
            for i, ly in enumerate(hooks.layers(m)):
                pn = hooks.get(ly, self.arch.post_attn_norm)
                y = writes[i].sum(0) + (self.b_O[i].float() if self.b_O[i] is not None else 0)
                writes[i] = writes[i] * hooks.norm_scale(pn, y) * hooks.norm_gain(m, pn)
        else:
            for i in range(self.L):
                if self.b_O[i] is not None:
                    bias[i] = float(self.b_O[i].float() @ w)
        heads = (writes @ w).cpu().numpy()
        mlp = (c["mlp_out"][:, 0, 0].float() @ w).cpu().numpy()
        return Trace(p, margin, margin_raw, lens, cue, heads, mlp, bias.numpy(), float(resid[0] @ w), const,
                     z.cpu(), resid.cpu())


def run_traces(lab: Lab, prompts: Sequence[Prompt], progress: bool = False) -> list[Trace]:
    it = prompts
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(prompts, desc="traces", leave=False)
    return [lab.trace(p) for p in it]


# ----------------------------------------------------------------------------------------- tables

def margins_table(traces: Sequence[Trace]) -> pd.DataFrame:
    """case_id relation_id k margin margin_raw."""
    return pd.DataFrame([{"case_id": t.prompt.case_id, "relation_id": t.prompt.relation_id, "k": t.prompt.k,
                          "margin": t.margin, "margin_raw": t.margin_raw} for t in traces])


def logit_lens(traces: Sequence[Trace]) -> pd.DataFrame:
    """Tidy: case_id k layer margin (layer 0 = embeddings, layer l = after decoder layer l-1)."""
    rows = [{"case_id": t.prompt.case_id, "k": t.prompt.k, "layer": i, "margin": float(v)}
            for t in traces for i, v in enumerate(t.lens)]
    return pd.DataFrame(rows)


def cue_attention(traces: Sequence[Trace]) -> pd.DataFrame:
    """Tidy: case_id k layer head mass margin (k = 0 has no cue and is left out)."""
    rows = []
    for t in traces:
        if t.prompt.k == 0:
            continue
        for (i, h), v in np.ndenumerate(t.cue):
            rows.append({"case_id": t.prompt.case_id, "k": t.prompt.k, "layer": i, "head": h, "mass": float(v),
                         "margin": t.margin})
    return pd.DataFrame(rows)


def cue_correlation(cue: pd.DataFrame) -> pd.DataFrame:
    """Per (k, layer, head): mean mass and the Pearson correlation of mass with margin over records."""
    def corr(g):
        ok = g["mass"].notna()
        r = np.corrcoef(g["mass"][ok], g["margin"][ok])[0, 1] if ok.sum() > 2 and g["mass"][ok].std() > 0 \
            else np.nan
        return pd.Series({"mass": g["mass"].mean(), "corr": r, "n": int(ok.sum())})
    return cue.groupby(["k", "layer", "head"]).apply(corr, include_groups=False).reset_index()


def dla(traces: Sequence[Trace], ks: Sequence[int] | None = None) -> pd.DataFrame:
    """Tidy: case_id k component layer head value margin_raw. Components: embed, head, attn_bias, mlp,
    const (final-norm bias); per (case_id, k) the values sum to margin_raw."""
    rows = []
    for t in traces:
        if ks is not None and t.prompt.k not in ks:
            continue
        base = {"case_id": t.prompt.case_id, "k": t.prompt.k, "margin_raw": t.margin_raw}
        rows.append({**base, "component": "embed", "layer": -1, "head": -1, "value": t.embed})
        rows.append({**base, "component": "const", "layer": -1, "head": -1, "value": t.const})
        for (i, h), v in np.ndenumerate(t.heads):
            rows.append({**base, "component": "head", "layer": i, "head": h, "value": float(v)})
        for i in range(len(t.mlp)):
            rows.append({**base, "component": "mlp", "layer": i, "head": -1, "value": float(t.mlp[i])})
            if t.attn_bias[i] != 0:
                rows.append({**base, "component": "attn_bias", "layer": i, "head": -1,
                             "value": float(t.attn_bias[i])})
    return pd.DataFrame(rows)


def dla_ranking(d: pd.DataFrame) -> pd.DataFrame:
    """Per component: mean value at each k and the shift (largest k minus smallest), sorted by shift."""
    g = d.groupby(["component", "layer", "head", "k"])["value"].mean().unstack("k")
    g.columns = [f"k{c}" for c in g.columns]
    g["shift"] = g.iloc[:, -1] - g.iloc[:, 0]
    return g.reset_index().sort_values("shift", ascending=False, key=np.abs).reset_index(drop=True)


def split(case_ids: Sequence[int], select_frac: float = 0.5) -> tuple[list[int], list[int]]:
    """Selection / evaluation split of records (ids in the given, already seeded, order)."""
    ids = list(dict.fromkeys(case_ids))
    n_sel = max(1, int(round(len(ids) * select_frac)))
    return ids[:n_sel], ids[n_sel:]
