"""Probes and metrics of the induction-head models, read during training and by the reports
(library functions on stacked models).

Memory-recall probes (Birth's code; argmax retrieval through one stored memory), each -> [S]:
  wo1  (W_O^2)  fraction of tokens k with argmax_j w_U(j)^T W_O^2 W_V^2 w_E(k) = k
  wk1  (W_K^2)  fraction of query tokens k with argmax_k' w_E(k)^T W_K^2 w_1(k') = k, queries and
                candidates k' from the same set (fixed triggers, else all tokens), as the authors' test_wk1;
                wk1_all: fixed-trigger queries against all N candidates
  wk0  (W_K^1)  fraction of t = 1..T-1 with argmax_{s in 0..T-2} p_t^T W_K^1 p_s = t-1 (no mask);
                wk0_64 on the first 64 positions; RPE bias: offset-1 is the argmax of b (1 or 0)
  ff1  (W_F)    mean over non-trigger tokens i of KL(pi_b(.|i) || softmax(W_U W_F w_E(i)))
Evaluations on a batch: in-context accuracy (outs >= 2), bigram loss (outs = 0), head loss, first
occurrence accuracy, attention probes (layer-1 previous token, layer-2 induction target), and
per-position-bucket accuracies.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.induction import SimplifiedInduction
from ..models.induction_fast import loss_logits


@torch.no_grad()
def memory_probes(m: SimplifiedInduction, T: int, pi_b: Tensor | None = None,
                  query_tokens: Tensor | None = None, trigger_tokens: Tensor | None = None) -> dict[str, Tensor]:
    """Memory-recall probes of a stacked model; each value [S]."""
    N = m.N
    E, U = m.W_E, m.W_U
    out: dict[str, Tensor] = {}
    M = U @ m.W_O2 @ m.W_V2 @ E.transpose(1, 2)                              # [S, N(j), N(k)]
    dev = E.device
    out["wo1"] = (M.argmax(1) == torch.arange(N, device=dev)).float().mean(1)
    Q = torch.arange(N, device=dev) if query_tokens is None else torch.as_tensor(query_tokens, device=dev).long()
    w1 = E @ (m.W_O1 @ m.W_V1).transpose(1, 2)                               # rows w_1(k)  [S, N, d]
    Kq = E[:, Q] @ m.W_K2                                                    # [S, |Q|, d]
    # the authors' test_wk1: queries and candidates range over the same set (the fixed triggers, or all)
    out["wk1"] = ((Kq @ w1[:, Q].transpose(1, 2)).argmax(2) == torch.arange(len(Q), device=dev)).float().mean(1)
    if query_tokens is not None:     # a harder probe: the fixed triggers against all N candidates
        out["wk1_all"] = ((Kq @ w1.transpose(1, 2)).argmax(2) == Q).float().mean(1)
    if m.uses_ape:
        for name, n in (("wk0", T), ("wk0_64", min(64, T))):
            P = m.P[:, :n]
            A = P[:, 1:] @ m.W_K1 @ P[:, :-1].transpose(1, 2)                # [S, n-1, n-1]
            out[name] = (A.argmax(2) == torch.arange(n - 1, device=dev)).float().mean(1)
    elif m.pos == "rel_bias":
        b = m.b_rel[:, 1:T]
        out["wk0"] = out["wk0_64"] = (b[:, 0] > b[:, 1:].max(1).values).float()   # strict: zeros at init fail
    if m.ffn == "linear" and pi_b is not None:
        L = U @ m.W_F @ E.transpose(1, 2)                                    # [S, N(j), N(i)]
        logq = L.transpose(1, 2).log_softmax(-1)                             # [S, i, j]
        p = pi_b.float().to(dev)[None]
        kl = (p * (torch.log(p.clamp(min=1e-30)) - logq)).sum(-1)             # [S, N]
        keep = torch.ones(N, dtype=torch.bool, device=dev)
        if trigger_tokens is not None:
            keep[torch.as_tensor(trigger_tokens).long()] = False
        out["ff1"] = kl[:, keep].mean(1)
    out["norm_W_K1"] = m.W_K1.flatten(1).norm(dim=1)
    out["norm_W_K2"] = m.W_K2.flatten(1).norm(dim=1)
    out["norm_W_O2"] = m.W_O2.flatten(1).norm(dim=1)
    return out


@torch.no_grad()
def batch_metrics(m, x: Tensor, y: Tensor, outs: Tensor, chunk: int = 32, bucket: int = 64,
             region: Tensor | None = None) -> dict[str, Tensor]:
    """Metrics of a stacked model on sequences x, y, outs [S, B, T]; values [S] (buckets: [S, nb]).

    acc_end (outs>=2), loss_head, loss_bigram (outs=0), acc_tot (outs>=1), acc_start (outs>=1, t<10),
    prev_tok (layer-1 argmax at t+1 is t where outs[t] >= 1), prev_tok_all (same at every t >= 1),
    ind_attn (layer-2 argmax s has z_{s-1} = z_t at outs >= 2), ind_mass (layer-2 attention weight on
    all such matched keys s at outs >= 2), bucket_acc / bucket_prev per position bucket of width ``bucket``. ``region`` [S,B,T] bool restricts the outs>=2 positions counted."""
    S, B, T = x.shape
    sums: dict[str, list] = {}
    simplified = isinstance(m, SimplifiedInduction)
    for i in range(0, B, chunk):
        xs, ys, os_ = x[:, i:i + chunk], y[:, i:i + chunk], outs[:, i:i + chunk]
        if simplified:
            lg, hk = loss_logits(m, xs, return_attn=True)
        else:
            lg, hk = m(xs, return_hooks=True)
            hk = {"attn1": hk["attn1"][:, :, 0], "attn2": hk["attn2"][:, :, 0]}
        ce = F.cross_entropy(lg.flatten(0, 2), ys.flatten(), reduction="none").view(ys.shape)
        hit = (lg.argmax(-1) == ys).float()
        ic = (os_ >= 2)
        if region is not None:
            ic = ic & region[:, i:i + chunk]
        # layer-1: position t+1 attends t, where outs[t] >= 1
        a1 = hk["attn1"].argmax(-1)                                          # [S,b,T]
        prev_ok = (a1[..., 1:] == torch.arange(T - 1, device=x.device)).float()
        prev_mask = (os_[..., :-1] >= 1).float()
        a2 = hk["attn2"].argmax(-1)
        zprev = torch.gather(xs, 2, (a2 - 1).clamp(min=0))
        ind_ok = ((zprev == xs) & (a2 >= 1)).float()
        matched = F.pad(xs[..., :-1], (1, 0), value=-1)[..., None, :] == xs[..., :, None]   # [S,b,T(t),T(s)]
        ind_mass = (hk["attn2"] * matched).sum(-1)
        parts = {
            "acc_end": (hit, ic.float()), "loss_head": (ce, ic.float()),
            "loss_bigram": (ce, (os_ == 0).float()), "acc_tot": (hit, (os_ >= 1).float()),
            "acc_start": (hit, ((os_ >= 1) & (torch.arange(T, device=x.device) < 10)).float()),
            "prev_tok": (prev_ok, prev_mask), "prev_tok_all": (prev_ok, torch.ones_like(prev_ok)),
            "ind_attn": (ind_ok, ic.float()), "ind_mass": (ind_mass, ic.float()),
        }
        nb = math.ceil(T / bucket)
        pad = nb * bucket - T
        for name, (v, msk) in parts.items():
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] = s[0] + (v * msk).sum((1, 2))
            s[1] = s[1] + msk.sum((1, 2))
        for name, (v, msk) in (("bucket_acc", (hit, ic.float())), ("bucket_prev", (prev_ok, prev_mask))):
            vv = F.pad(v * msk, (0, pad + (T - v.shape[-1])))
            mm = F.pad(msk, (0, pad + (T - msk.shape[-1])))
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] = s[0] + vv.view(S, -1, nb, bucket).sum((1, 3))
            s[1] = s[1] + mm.view(S, -1, nb, bucket).sum((1, 3))
    out = {}
    for k, (a, b) in sums.items():
        b = torch.as_tensor(b)
        out[k] = torch.where(b > 0, torch.as_tensor(a) / b.clamp(min=1), torch.full_like(b, float("nan")))
    return out


@dataclasses.dataclass(frozen=True)
class LengthResult:
    """A trained model's metrics on sequences of length T (beyond its training length), whose
    in-context pairs all lie past the first T_train positions (:func:`delayed_batch`).

    Stored flat in the run's metrics (``acc_end_T512``, ...: scalars reach the parquet table); read
    them back with :meth:`read`, never by formatting key names."""
    T: int
    acc_end: float                 # in-context accuracy (outs >= 2)
    prev_tok: float                # layer-1 previous-token accuracy at every position
    ind_mass: float                # layer-2 attention weight on the matched keys (z_{s-1} = z_t) at outs >= 2
    bucket_acc: list[float]        # acc_end per position bucket
    bucket_prev: list[float]       # previous-token accuracy per position bucket

    FIELDS = ("acc_end", "prev_tok", "ind_mass", "bucket_acc", "bucket_prev")

    def flat(self) -> dict[str, float | list[float]]:
        return {f"{name}_T{self.T}": getattr(self, name) for name in self.FIELDS}

    @classmethod
    def read(cls, metrics: Mapping, T: int) -> LengthResult:
        return cls(T, **{name: metrics[f"{name}_T{T}"] for name in cls.FIELDS})
