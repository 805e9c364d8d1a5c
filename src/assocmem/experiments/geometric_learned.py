"""Geometric reproduction, families on trained models: E3 probes, E4 gating, E5 transfer, E6 multi-hop.

See ``experiments.geometric`` for the entry point; every protocol is [ours] (spec geometric.md).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import findings, plots
from ..analysis import geometric as geo_analysis
from ..config import build
from ..registry import get_task
from ..runners.geometric import GeoConfig
from ..store import RunStore
from ..sweep import run_configs
from . import geometric_plots
from .geometric_common import E6_MIN_R, Scale, _load, _optim, _records, _seeds, bisect, d_guess

# ---- E3 + E4: probes and gating on trained models ----------------------------------------------------------------
def e3_e4(sc: Scale, store: RunStore, backend, force: bool, fig_dir: Path) -> list[findings.Family]:
    N, R = sc.e3_N, 4
    variants = {}
    for d in sc.e3_d:
        variants[f"d={d}, init 0.01"] = _seeds(sc, **{"task.N": N, "task.R": R, "model.d_model": d,
                                                      "model.emb_std": 0.01}, **_optim(sc))
        variants[f"d={d}, init 1/sqrt(d)"] = _seeds(sc, **{"task.N": N, "task.R": R, "model.d_model": d}, **_optim(sc))
    run_configs(get_task("geometric"), [c for cs in variants.values() for c in cs], store, backend=backend,
                force=force, progress=False, desc="geometric E3")
    rows, gat = [], {}
    for label, cfgs in variants.items():
        for c in cfgs:
            W = _load(store, c)
            bij = W["bij"]
            g = torch.Generator().manual_seed(c.seed)
            E, U = W["W_E"][:N], W["W_U"]
            p = geo_analysis.superposition_probe(E, bij, U, g)
            dec = geo_analysis.per_relation_decoding(E, bij, U, g)
            sw = geo_analysis.causal_swap(W, bij, 400, g)
            gt = geo_analysis.mlp_gating(W, bij, gen=g)
            rows.append({"label": label, "seed": c.seed, **p, "decoding": float(np.mean(dec)), **sw,
                         "linearity": float(np.mean(gt["linearity_r2"])), "selectivity": gt["mean_selectivity"],
                         "abl_target": float(np.mean(np.diag(gt["ablation"]))),
                         "abl_other": float((np.sum(gt["ablation"]) - np.trace(gt["ablation"])) / (R * R - R))})
            gat.setdefault(label, gt)
    df = pd.DataFrame(rows)
    plots.save(geometric_plots.probes(df), fig_dir, "geo_e3_probes")
    lab0 = list(variants)[0]
    plots.save(geometric_plots.gating(gat[lab0]["selectivity"], gat[lab0]["ablation"], R), fig_dir, "geo_e4_gating")
    s = df.groupby("label").mean(numeric_only=True)
    best = s["r2_heldout"].idxmax()
    c3 = [findings.trend(f"held-out R^2 >= 0.6 with shuffled control <= 0 ({best})",
                       s.loc[best, "r2_heldout"] >= 0.6 and s.loc[best, "r2_shuffled"] <= 0,
                       ours=f"{s.loc[best, 'r2_heldout']:.3f} / {s.loc[best, 'r2_shuffled']:.3f}",
                       reference="0.70-0.92 / -0.1 to -1.8", source="derived",
                       note="reference: our toy model (spec E3); the law (>= 0.6, control <= 0) is judged")]
    for lab, r in s.iterrows():
        c3.append(findings.Check(f"{lab}: held-out R^2 / shuffled", round(r.r2_heldout, 3), "trend only",
                               note=f"shuffled {r.r2_shuffled:.3f}"))
        c3.append(findings.trend(f"{lab}: per-relation decoding far above 1/N={1 / N:.4f}", r.decoding > 10 / N,
                               ours=round(r.decoding, 3)))
        c3.append(findings.Check(f"{lab}: causal swap success / preservation", round(r.swap_success, 3), "trend only",
                               note=f"preservation {r.swap_preservation:.3f}; our uncalibrated targets 0.8 / 0.95"))
    c4 = []
    for lab, r in s.iterrows():
        c4.append(findings.trend(f"{lab}: within-relation linearity R^2 >= 0.95", r.linearity >= 0.95,
                               ours=round(r.linearity, 3), reference="0.95-0.998", source="derived",
                               note="reference: our toy model (spec E4); the law (>= 0.95) is judged"))
        c4.append(findings.Check(f"{lab}: mean unit selectivity (1/R = {1 / R})", round(r.selectivity, 3), "trend only",
                               note="distributed gating expected (slightly above 1/R)"))
        c4.append(findings.trend(f"{lab}: ablation hurts the targeted relation more than others",
                               r.abl_target < r.abl_other, ours=f"{r.abl_target:.3f} vs {r.abl_other:.3f}"))
    t3 = (f"N = {N}, R = 4, trained to 100% (lr 1e-2); codes = learned W_U rows; ridge 1e-3; 80/20 subject split."
          f"\n\n```\n{s[['r2_heldout', 'r2_shuffled', 'decoding', 'swap_success', 'swap_preservation']].round(3).to_string()}\n```")
    t4 = (f"Same models. Ablation zeroes the m/R units with the largest (mean activation on r) - (mean on others); "
          f"figure: selectivity histogram and ablation matrix of '{lab0}', seed 0.\n\n"
          f"```\n{s[['linearity', 'selectivity', 'abl_target', 'abl_other']].round(3).to_string()}\n```")
    return [findings.Family("E3 superposition probes", ["figures/geo_e3_probes.png"], c3, t3),
            findings.Family("E4 MLP gating", ["figures/geo_e4_gating.png"], c4, t4)]


# ---- E5: zero-shot transfer -----------------------------------------------------------------------------------------
E5_KNOBS = {
    "default": {},
    "init 0.01": {"model.emb_std": 0.01},
    "wd 1e-2, to loss 1e-4": {"optim.weight_decay": 1e-2, "optim.stop_loss": 1e-4},
    "init 0.01, wd 1e-3, to loss 1e-4": {"model.emb_std": 0.01, "optim.weight_decay": 1e-3, "optim.stop_loss": 1e-4},
    "frozen W_U": {"model.freeze_unembed": True},
    "frozen W_U, init 0.01": {"model.freeze_unembed": True, "model.emb_std": 0.01},
    "small MLP": {},                                           # m = 2 d* (filled in below)
    "LayerNorm": {"model.layernorm": True},
    "LayerNorm, init 0.01, to loss 1e-3": {"model.layernorm": True, "model.emb_std": 0.01, "optim.stop_loss": 1e-3},
}


def e5(sc: Scale, store: RunStore, backend, force: bool, fig_dir: Path, dstar: int | None) -> findings.Family:
    N, R, d = sc.e5_N, 4, sc.e5_d
    base = {"task.N": N, "task.R": R, "model.d_model": d, **_optim(sc)}
    knobs = {}
    for name in (sc.e5_knobs or tuple(E5_KNOBS)):
        kw = dict(E5_KNOBS[name])
        if "optim.stop_loss" in kw:        # train past 100%: stop on the loss only
            kw.update({"optim.stop": "loss", "optim.patience": 0, "optim.max_steps": sc.e5_max_steps})
        if name == "small MLP":
            kw["model.d_mlp"] = 2 * (dstar or 8)
            name = f"small MLP m={2 * (dstar or 8)}"
        knobs[name] = kw
    cfgs = {k: _seeds(sc, **{**base, **v}) for k, v in knobs.items()}
    run_configs(get_task("geometric"), [c for cs in cfgs.values() for c in cs], store, backend=backend,
                force=force, progress=False, desc="geometric E5")
    rows = []
    for knob, cs in cfgs.items():
        Ws = [_load(store, c) for c in cs]
        for i, (c, W) in enumerate(zip(cs, Ws)):
            bij, ln = W["bij"], c.model.layernorm
            new = geo_analysis.fresh_bijections(N, R, 10_000 + c.seed)
            g = torch.Generator().manual_seed(c.seed)
            other = Ws[(i + 1) % len(Ws)]
            rows.append({"knob": knob, "seed": c.seed,
                         "T1_regress": geo_analysis.transfer_regression(W, bij, new, ln),
                         "T1_regress_cv": geo_analysis.transfer_regression(W, bij, new, ln, lam=None, gen=g),
                         "T1_inverse": geo_analysis.transfer_inverse(W, bij, new, ln),
                         "random": geo_analysis.random_reinit_accuracy(W, new, g, ln),
                         "other_seed": geo_analysis.transfer_from(W, other, other["bij"], new, ln) if len(Ws) > 1 else np.nan,
                         "reconstruct": geo_analysis.transfer_regression(W, bij, bij, ln),
                         "steps_scratch": _records(store, [c])[0]["steps"]})
    df = pd.DataFrame(rows)
    plots.save(geometric_plots.transfer(df), fig_dir, "geo_e5_transfer")
    s = df.groupby("knob").mean(numeric_only=True)
    methods = {"T1_regress": "regression map (spec E3a, ridge 1e-3)", "T1_regress_cv": "regression map, ridge by held-out R^2",
               "T1_inverse": "inverse of the linearised selector"}
    s["T1_best"] = s[list(methods)].max(1)
    best = s["T1_best"].idxmax()
    method = s.loc[best, list(methods)].astype(float).idxmax()
    # T2 on the best knob: train only the subject embeddings on F', from random and from the T1 re-initialisation
    c = cfgs[best][0]
    W = _load(store, c)
    o = build(type(c.optim), {**dataclasses.asdict(c.optim), "stop": "acc", "patience": 0,
                              "max_steps": sc.e5_t2_steps})
    new = geo_analysis.fresh_bijections(N, R, 10_000 + c.seed)
    t2 = geo_analysis.retrain_embeddings(W, new, o, torch.Generator().manual_seed(1), c.model.layernorm)
    t2i = geo_analysis.retrain_embeddings(W, new, o, torch.Generator().manual_seed(1), c.model.layernorm,
                                init=geo_analysis.regression_embeddings(W, W["bij"], new, lam=None,
                                                              gen=torch.Generator().manual_seed(c.seed)))
    checks = [findings.trend(f"best zero-shot transfer >= 0.9 ({best}; {methods[method]})", s.loc[best, "T1_best"] >= 0.9,
                           ours=round(float(s.loc[best, "T1_best"]), 3), reference="0.10-0.30", source="derived",
                           note=f"reference: T1 of our toy model (spec caution); goal from the issue; baselines: random re-init {s.loc[best, 'random']:.4f}, "
                                f"map from another seed {s.loc[best, 'other_seed']:.4f}"),
              findings.trend("best zero-shot transfer far above the baselines (>= 10x)",
                           s.loc[best, "T1_best"] >= 10 * max(s.loc[best, "random"], np.nan_to_num(s.loc[best, "other_seed"]),
                                                              1 / N), ours=round(float(s.loc[best, "T1_best"]), 3)),
              findings.Check("T2 (best knob): steps to 100% training only E' from random init", t2["steps"], "trend only",
                           note=f"final acc {t2['accuracy']:.3f} (cap {sc.e5_t2_steps} steps); from the T1 "
                                f"re-initialisation: {t2i['steps']} steps, acc {t2i['accuracy']:.3f}; scratch "
                                f"(all weights) {s.loc[best, 'steps_scratch']:.0f} steps")]
    for knob, r in s.iterrows():
        checks.append(findings.Check(f"T1 {knob}", round(float(r.T1_best), 3), "trend only",
                                   note=f"regress {r.T1_regress:.3f}, regress-cv {r.T1_regress_cv:.3f}, inverse "
                                        f"{r.T1_inverse:.3f}, random {r.random:.4f}, other seed {r.other_seed:.4f}, "
                                        f"reconstruct F {r.reconstruct:.3f}"))
    text = (f"N = {N}, R = 4, d = {d} (d*(N, 4) = {dstar}), {sc.seeds} seeds. Train on F, draw fresh bijections F' (same N, "
            "R); attention, MLP, relation and position embeddings and W_U stay frozen; only subject embeddings are "
            "replaced. T1 (zero steps): 'regress' = e'_s = Phi'_s M + b with M from the E3a fit on F (codes = W_U rows), "
            "ridge 1e-3 or chosen by held-out R^2; 'inverse' = [ours] least-squares inversion of the per-relation linear "
            "fit of the residual the logits see, with target residuals taken from the trained model's own answers. "
            "'reconstruct' applies the regression to F itself; 'other seed' applies the map of another seed's model. "
            "Knobs 'to loss ...' train past 100% until the loss is below that value (at most "
            f"{sc.e5_max_steps} steps).\n\nBest: **{best}** with {methods[method]}: {s.loc[best, 'T1_best']:.3f} "
            f"(random re-init {s.loc[best, 'random']:.4f}).\n\n```\n{s.round(3).to_string()}\n```")
    return findings.Family("E5 zero-shot transfer", ["figures/geo_e5_transfer.png"], checks, text)


# ---- E6: multi-hop ------------------------------------------------------------------------------------------------
E6_SLOTS = 3


def e6_configs(sc: Scale, R: int, k: int, cot: bool, d: int) -> list[GeoConfig]:
    """The seeds' configs of one E6 cell at width d. At k = 1 chain of thought changes nothing (the
    same tokens, one target at the answer slot: ``tasks.geometric.multi_hop``), so both k = 1 cells
    name the no-CoT runs and the search trains them once."""
    return _seeds(sc, **{"task.N": sc.e6_N, "task.R": R, "task.format": "slots", "task.k": k, "task.K": E6_SLOTS,
                         "task.cot": cot and k > 1, "model.d_model": d, "model.n_heads": E6_SLOTS}, **_optim(sc))


def e6(sc: Scale, store: RunStore, backend, force: bool, fig_dir: Path) -> findings.Family:
    K = E6_SLOTS
    cells = {(R, k, cot): functools.partial(e6_configs, sc, R, k, cot)
             for R in sc.e6_R for k in sc.e6_k for cot in (True, False)}
    # search starts: CoT as single hop (R codes per subject), no CoT with R^k chain codes per subject
    guess = {(R, k, cot): d_guess(sc.e6_N, R if cot else R ** k) for (R, k, cot) in cells}
    dstar = bisect(store, cells, sc.e6_grid, backend, force, "geometric E6", guess=guess)
    df = pd.DataFrame([{"R": R, "k": k, "cot": cot, "dstar": v} for (R, k, cot), v in dstar.items()])
    plots.save(geometric_plots.multihop(df.dropna()), fig_dir, "geo_e6_multihop")
    checks = []
    top = max(sc.e6_grid)
    for R in sc.e6_R:
        g = df[df.R == R].set_index(["cot", "k"])["dstar"].fillna(2 * top)
        k1, kK = min(sc.e6_k), max(sc.e6_k)
        grow_c, grow_n = g[(True, kK)] / g[(True, k1)], g[(False, kK)] / g[(False, k1)]
        note = ("missing d* (above the grid) counted as 2x the grid maximum; absolute d*: "
                f"CoT {g[True].to_dict()}, no CoT {g[False].to_dict()}")
        name = f"R={R}: d* without CoT grows with k much faster than with CoT"
        ours = f"noCoT x{grow_n:.2f} vs CoT x{grow_c:.2f} (k {k1}->{kK})"
        if R >= E6_MIN_R:
            checks.append(findings.trend(name, grow_n >= 2 * grow_c, ours=ours, note=note))
            checks.append(findings.trend(f"R={R}, k={kK}: d* without CoT above d* with CoT",
                                       g[(False, kK)] > g[(True, kK)], ours=f"{g[(False, kK)]:.0f} vs {g[(True, kK)]:.0f}"))
        else:   # R^k chain codes too few for the 2x test to resolve (E6_MIN_R in geometric_common)
            checks.append(findings.Check(name, ours, "trend only",
                                       note=f"R < {E6_MIN_R}: only R^{kK} = {R ** kK} chain codes; " + note))
    text = (f"N = {sc.e6_N}, slot format with K = {K}; both regimes use the same model ({K} heads, so the two differ "
            "only in the targets): CoT success = every chain right under greedy decoding; no CoT: one target. At k = 1 "
            "the two are the same task (one target at the answer slot) and share their runs. "
            f"Grid {list(sc.e6_grid)}; the search starts at 0.3 R log2 N (CoT) and 0.3 R^k log2 N (no CoT). "
            f"The growth check is a verdict for R >= {E6_MIN_R} (constructions: R^(k-1) separation); smaller R is "
            "shown as trend only: with R^k = 8 chain codes the learned no-CoT d* grows like a single-hop model's "
            f"with 8 relations, the same order as CoT's constant cost of routing k relations to k positions.\n\n```\n{df.to_string(index=False)}\n```")
    return findings.Family("E6 multi-hop: CoT vs no CoT", ["figures/geo_e6_multihop.png"], checks, text)


