"""Reproduction of *Geometric Factual Recall in Transformers* (spec geometric.md; all protocols [ours]).

``reproduce(out_dir, scale, jobs, force)`` runs E0 (constructions), E1 (d* vs N, R), E2 (frozen
embedding control), E3 (superposition probes), E4 (MLP gating), E5 (zero-shot transfer) and E6
(multi-hop with / without CoT; E3-E6 live in ``geometric_learned``); trained runs live in ``RunStore(out_dir)`` (reruns reuse them),
figures go to ``out_dir/figures``; it returns the report's Section (``report.write_report`` renders it).

Thresholds d* and m* are found by bisection over a sorted grid (all cells advance one round at a
time, so each round is one sweep); a grid value counts as a success when at least half of the seeds
reach 100% accuracy on every fact (CoT: every chain under greedy decoding).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import findings, plots
from ..models.geometric import StackedTransformer
from ..store import RunStore
from ..sweep import LocalBackend
from ..tasks.geometric import all_chains, draw_bijections, log2_factorial, multi_hop, single_hop
from ..theory import geometric as geo_theory
from . import geometric_plots
from .geometric_common import (BASE_OPTIM, BIG_N, RECONSTRUCTED, SCALES, Scale, _optim, _seeds,  # noqa: F401
                               bisect, d_guess, make_cfg)
from .geometric_learned import e3_e4, e5, e6

# ---- E0: constructions ------------------------------------------------------------------------------------
def e0(sc: Scale, fig_dir: Path) -> findings.Family:
    rows, noisy = [], []
    R = 4
    for N in sc.e0_N:
        bij = draw_bijections(N, R, torch.Generator().manual_seed(N))
        data = single_hop(bij)
        for d0 in (2, 4, 8, 16, 24, 32):
            W = geo_theory.single_hop_block(bij, d0, torch.Generator().manual_seed(d0))
            ev = geo_theory.recall_metrics(StackedTransformer.from_weights(W, dtype=torch.float64), data)
            rows.append({"N": N, "d0": d0, "accuracy": float(ev["accuracy"]), "min_margin": float(ev["min_margin"])})
            Wn = geo_theory.with_embedding_noise(W, N, d0, R, 0.5, torch.Generator().manual_seed(100 + d0))
            evn = geo_theory.recall_metrics(StackedTransformer.from_weights(Wn), data)
            noisy.append({"N": N, "d0": d0, "accuracy": float(evn["accuracy"])})
    df, dn = pd.DataFrame(rows), pd.DataFrame(noisy)
    plots.save(geometric_plots.margin_vs_d0(df, "min_margin", "block construction, R=4"), fig_dir, "geo_e0_margin")
    plots.save(geometric_plots.margin_vs_d0(dn, "accuracy", "accuracy under embedding noise 0.5/block"), fig_dir, "geo_e0_noise")
    # multi-hop constructions at every N (CoT: R = 4, d0 = 8, sampled chains for k > 2; no CoT: the spec's cells)
    g = torch.Generator().manual_seed(1)
    cot, nocot = {}, {}
    for N in sc.e0_N:
        bij = draw_bijections(N, 4, g)
        for k in (1, 2, 4, 8):
            chains = all_chains(4, k) if k <= 2 else torch.randint(0, 4, (4, k), generator=g)
            m = StackedTransformer.from_weights(geo_theory.cot_multihop(bij, 8, k, g))
            cot[(N, k)] = float(geo_theory.recall_metrics(m, multi_hop(bij, k, k, True, chains))["accuracy"])
        for k, Rn in [(2, 2), (2, 3), (3, 2), (2, 4)]:
            b2 = draw_bijections(N, Rn, g)
            m = StackedTransformer.from_weights(geo_theory.nocot_multihop(b2, 8, k, 3, g))
            nocot[(N, k, Rn)] = float(geo_theory.recall_metrics(m, multi_hop(b2, k, 3, False))["accuracy"])
    ov = []
    for N in sc.e0_overlap_N:
        b = draw_bijections(N, 4, torch.Generator().manual_seed(N))
        for C in (2, 4):
            for D in (32, 48, 64, 96, 128, 192, 256, 384):
                W = geo_theory.overlapping(b[:C], D, torch.Generator().manual_seed(D))
                if float(geo_theory.recall_metrics(StackedTransformer.from_weights(W), single_hop(b[:C]))["accuracy"]) == 1.0:
                    ov.append({"N": N, "C": C, "Dstar": D})
                    break
    dov = pd.DataFrame(ov)
    plots.save(geometric_plots.overlap_dstar(dov), fig_dir, "geo_e0_overlap")
    table = {(2, 256): 48, (2, 1024): 64, (4, 256): 192, (4, 1024): 256}
    checks = [findings.trend("block construction: 100% for every N and d0 >= 2", bool((df["accuracy"] == 1).all()),
                           ours=f"{(df['accuracy'] == 1).mean():.0%} of cells")]
    for N in sc.e0_N:
        for d0, ref in ((16, {256: 0.145, 4096: 0.078}), (32, {256: 0.375, 4096: 0.220})):
            if N in ref:
                v = float(df[(df.N == N) & (df.d0 == d0)]["min_margin"].iloc[0])
                checks.append(findings.compare(f"min margin N={N}, d0={d0}", v, ref[N], 0.05, source="derived",
                                               note="spec's numeric check of our construction (one code draw)"))
    piv = df.pivot(index="d0", columns="N", values="min_margin")
    checks.append(findings.trend("law: min margin rises with d0 at every N and is smallest at the largest N "
                                 "(margin ~ 1 - sqrt(4 ln N / d0))",
                                 bool((piv.diff().iloc[1:] >= -1e-9).all().all()
                                      and (piv[max(piv.columns)] <= piv[min(piv.columns)] + 1e-9).all()),
                                 ours=f"d0={max(piv.index)}: " + ", ".join(f"N={N} {v:.3f}" for N, v in piv.iloc[-1].items())))
    nd = {N: int(dn[(dn.N == N) & (dn.accuracy == 1)]["d0"].min()) if (dn[dn.N == N].accuracy == 1).any() else None
          for N in sc.e0_N}
    checks.append(findings.Check("noise 0.5/block: smallest d0 at 100% per N", str(nd), "reference",
                                 "24 for N = 256, 1024, 4096", source="derived", note=findings.DERIVED_NOTE))
    ns = sorted(nd)
    slow = all(nd[N] is not None for N in ns) and all(nd[a] <= nd[b] for a, b in zip(ns, ns[1:])) and (
        len(ns) < 2 or nd[ns[-1]] <= nd[ns[0]] * math.log(ns[-1]) / math.log(ns[0]))
    checks.append(findings.trend("law: noise 0.5/block: smallest d0 at 100% does not fall with N and grows no faster "
                                 "than log N", slow, ours=str(nd)))
    checks.append(findings.trend(f"CoT construction (R=4, d0=8): 100% for k = 1, 2, 4, 8 at N = {list(sc.e0_N)}",
                               all(v == 1 for v in cot.values()), ours=f"{sum(v == 1 for v in cot.values())}/{len(cot)} cells"))
    checks.append(findings.trend(f"no-CoT construction (d0=8): 100% for (k,R) = (2,2), (2,3), (3,2), (2,4) at N = "
                               f"{list(sc.e0_N)}", all(v == 1 for v in nocot.values()),
                               ours=f"{sum(v == 1 for v in nocot.values())}/{len(nocot)} cells",
                               note="(2,4): 16 chain blocks, d = 152, m = 256"))
    dst = {(r["C"], r["N"]): r["Dstar"] for r in ov}
    for (C, N), ref in table.items():
        if N in sc.e0_overlap_N:
            checks.append(findings.Check(f"overlap D* C={C} N={N}", dst.get((C, N)), "reference", ref,
                                         source="derived", note="spec: within a factor 1.5 of this table; "
                                                                + findings.DERIVED_NOTE))
    Ns = sorted(sc.e0_overlap_N)
    grows_c = all(dst.get((2, N), math.inf) < dst.get((4, N), -math.inf) for N in Ns)
    log_n = all(dst.get((C, Ns[-1]), math.inf) <= 1.5 * math.log(Ns[-1]) / math.log(Ns[0]) * dst.get((C, Ns[0]), 0)
                for C in (2, 4))
    checks.append(findings.trend("law: overlap D* grows with C at every N and at most like log N across N "
                                 "(ratio <= 1.5 ln N_max / ln N_min)", grows_c and log_n, ours=str(dst)))
    text = ("Exact weights loaded into the model class (float64 for the block construction, since d0 = 2 codes "
            "can be closer than float32 resolution). Margins are min over all facts, one code draw.\n\n"
            + "```\n" + df.pivot(index="d0", columns="N", values="min_margin").round(3).to_string() + "\n```")
    return findings.Family("E0 constructions", ["figures/geo_e0_margin.png", "figures/geo_e0_noise.png",
                                              "figures/geo_e0_overlap.png"], checks, text)



def e1(sc: Scale, store: RunStore, backend, force: bool, fig_dir: Path) -> tuple[findings.Family, pd.DataFrame]:
    keys = [(N, R) for N in sc.e1_N for R in sc.e1_R] + [(N, 4) for N in sc.e1_R4_N if N not in sc.e1_N]
    cells = {(N, R): (lambda d, N=N, R=R: _seeds(sc, **{"task.N": N, "task.R": R, "model.d_model": d}, **_optim(sc))
                      [:1 if N >= BIG_N else None]) for N, R in keys}
    dstar = bisect(store, cells, sc.d_grid, backend, force, "geometric E1",
                   guess={k: d_guess(*k) for k in keys})
    df = pd.DataFrame([{"N": N, "R": R, "dstar": v} for (N, R), v in dstar.items()]).dropna()
    runs = store.table("geometric")
    runs = runs[runs["task.format"].eq("sr") & ~runs["model.freeze_embed"] & ~runs["model.freeze_unembed"]
                & runs["model.emb_std"].eq(0.0) & runs["task.N"].isin([k[0] for k in keys])
                & runs["model.d_mlp"].eq(0) & ~runs["model.layernorm"] & runs["optim.stop"].eq("acc")]
    runs, excluded = findings.usable_runs(runs)       # diverged runs have no accuracy: counted, not averaged
    plots.save(geometric_plots.acc_vs_d(runs), fig_dir, "geo_e1_acc_vs_d")
    x = (df["R"] * np.log2(df["N"])).to_numpy(float)
    alpha = beta = None
    if len(df) >= 2:
        alpha, beta = (float(v) for v in np.polyfit(x, df["dstar"].to_numpy(float), 1))
    plots.save(geometric_plots.dstar_vs_logN(df, alpha, beta), fig_dir, "geo_e1_dstar")
    checks = []
    df["ratio"] = df["dstar"] / (df["R"] * np.log2(df["N"]))
    for R, g in df.groupby("R"):
        if len(g) >= 2:
            spread = float(g["ratio"].max() / g["ratio"].min())
            checks.append(findings.trend(f"R={R}: d*/(R log2 N) within 1.5x across N={sorted(g.N.tolist())}",
                                       spread <= 1.5, ours=round(spread, 3)))
    for N, g in df.groupby("N"):
        if len(g) >= 2:
            g = g.sort_values("R")
            checks.append(findings.trend(f"N={N}: d* grows with R", bool(np.all(np.diff(g["dstar"]) >= 0))
                                       and g["dstar"].iloc[-1] > g["dstar"].iloc[0], ours=str(dict(zip(g.R, g.dstar)))))
    lb_ok = all(r.dstar >= r.R * log2_factorial(int(r.N)) / (r.N * 16) for r in df.itertuples())
    checks.append(findings.trend("every trained d* lies above the counting bound (b = 16)", lb_ok))
    if alpha is not None:
        checks.append(findings.Check("fit d* = alpha R log2 N + beta: alpha", round(alpha, 3), "trend only",
                                   note=f"beta = {beta:.2f}"))
    big = df[(df.N == 1024) & (df.R == 4)]
    if len(big):
        checks.append(findings.trend("d*(N=1024, R=4) in the low tens or less", float(big.dstar.iloc[0]) <= 32,
                                   ours=float(big.dstar.iloc[0]), reference=12, source="derived",
                                   note="reference: d* of our numpy toy without attention (spec calibration); "
                                        "the law (<= 32) is judged"))
    text = ("Learned embeddings and unembedding, m = 4d, AdamW lr 1e-2, full batch, at most "
            f"{sc.max_steps} steps (patience {BASE_OPTIM['patience']}), {sc.seeds} seeds (one for N >= {BIG_N}); d* = "
            f"smallest d on the grid {list(sc.d_grid)} where at least half of the seeds reach 100%; the search starts "
            f"at d ~ 0.3 R log2 N and walks one grid step at a time (same threshold as bisection for monotone success).\n\n```\n{df.to_string(index=False)}\n```")
    if excluded:
        text += f"\n\nAccuracy-vs-d curves: {excluded}."
    return findings.Family("E1 minimal dimension d*", ["figures/geo_e1_acc_vs_d.png", "figures/geo_e1_dstar.png"],
                         checks, text), df


# ---- E2: frozen-embedding control -----------------------------------------------------------------------------
def e2(sc: Scale, store: RunStore, backend, force: bool, fig_dir: Path) -> findings.Family:
    R = 2
    cells = {}
    for N in sc.e2_N:
        for regime, frz in (("frozen E, W_U", True), ("learned E, W_U", False)):
            cells[(N, regime)] = (lambda m, N=N, frz=frz: _seeds(
                sc, **{"task.N": N, "task.R": R, "model.d_model": sc.e2_d, "model.d_mlp": m,
                       "model.freeze_embed": frz, "model.freeze_unembed": frz}, **_optim(sc)))
    mstar = bisect(store, cells, sc.m_grid, backend, force, "geometric E2")
    df = pd.DataFrame([{"N": N, "NR": N * R, "regime": reg, "mstar": v} for (N, reg), v in mstar.items()])
    plots.save(geometric_plots.frozen_width(df.dropna()), fig_dir, "geo_e2_frozen_width")
    fz = df[df.regime.str.startswith("frozen")].dropna().sort_values("N")
    ln = df[df.regime.str.startswith("learned")].dropna().sort_values("N")
    checks = []
    if len(fz) >= 2:
        slope = float(np.polyfit(np.log2(fz["NR"]), np.log2(fz["mstar"]), 1)[0])
        checks.append(findings.trend("frozen control: m* grows with N*R (log-log slope > 0.5)", slope > 0.5,
                                   ours=round(slope, 2), note="prior work: m*d proportional to N*R"))
    if len(ln) >= 2 and len(fz) >= 2:
        checks.append(findings.trend("learned E needs a much smaller MLP than the frozen control at the largest N",
                                   float(ln.mstar.iloc[-1]) < float(fz.mstar.iloc[-1]),
                                   ours=f"{ln.mstar.iloc[-1]} vs {fz.mstar.iloc[-1]}"))
    missing = df[df.mstar.isna()]
    text = (f"d = {sc.e2_d}, R = {R}; width m searched on {list(sc.m_grid)}. None = even the largest width failed."
            f"\n\n```\n{df.to_string(index=False)}\n```")
    if len(missing):
        text += "\n\nCells without m* on the grid are left out of the figure."
    return findings.Family("E2 frozen-embedding control", ["figures/geo_e2_frozen_width.png"], checks, text)


# ---- entry point ------------------------------------------------------------------------------------------------------
def reproduce(out_dir: str | Path, scale: str = "quick", jobs: int | None = None, force: bool = False,
              backend=None) -> findings.Section:
    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not allowed (allowed: {', '.join(SCALES)})")
    sc = SCALES[scale]
    out = Path(out_dir)
    fig_dir = out / "figures"
    store = RunStore(out)
    backend = backend or LocalBackend(jobs or 1)
    times, fams = {}, []
    t0 = time.perf_counter()
    fams.append(e0(sc, fig_dir))
    times["E0"] = time.perf_counter() - t0
    t = time.perf_counter()
    f1, d1 = e1(sc, store, backend, force, fig_dir)
    fams.append(f1)
    times["E1"] = time.perf_counter() - t
    for name, fn in (("E2", lambda: [e2(sc, store, backend, force, fig_dir)]),
                     ("E3/E4", lambda: e3_e4(sc, store, backend, force, fig_dir)),
                     ("E5", lambda: [e5(sc, store, backend, force, fig_dir, _dstar_at(d1, sc.e5_N, 4))]),
                     ("E6", lambda: [e6(sc, store, backend, force, fig_dir)])):
        t = time.perf_counter()
        fams.extend(fn())
        times[name] = time.perf_counter() - t
    store.write_table()
    sec = findings.Section("geometric", "Geometric factual recall in transformers (Ravfogel, Yehudai, Bruna, Bietti 2026)",
                         intro=RECONSTRUCTED + f"\n\nScale: {scale}. Lower bound curves: d >= R log2(N!)/(N b).",
                         families=fams,
                         meta=findings.run_meta(scale=scale, wall_s=round(time.perf_counter() - t0, 1),
                                              **{f"{k} s": round(v, 1) for k, v in times.items()}))
    return sec


def _dstar_at(df: pd.DataFrame, N: int, R: int) -> int | None:
    g = df[(df.N == N) & (df.R == R)]
    return int(g.dstar.iloc[0]) if len(g) else None
