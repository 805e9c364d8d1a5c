"""Report families for Wang & Sato (knowledge hijack): APE vs RPE beyond the training length, and the
hijack prompt families against the closed-form rule. Called by ``experiments.induction.reproduce``.

``ws`` maps the positional variant ('ape', 'rel_bias') to its training config; ``metrics`` and
``models`` map it to the stored run's metrics and the loaded trained model; ``sc`` is the scale.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import findings, plots
from ..analysis.induction_hijack import fit_ratio_by_winners, last_logits, make_families, outcome_table
from ..analysis.induction_length import length_remedy
from ..runners.induction_probes import LengthResult
from ..tasks.induction import CharStats
from ..theory.induction import build_amt, centred_log_bigram, count_rule_logits, fit_count_rule, fit_lambda_mu
from . import induction_plots

LABEL = {"ape": "APE", "rel_bias": "RPE"}


def length_family(ws: dict, metrics: dict, sc, fig_dir: Path, delay_df: pd.DataFrame,
                  models: dict | None = None) -> findings.Family:
    """C-13: per-bucket accuracy at T_test > T_train, and the delay plot (constructions from
    ``delay_df`` plus the trained models); with the trained ``models``, which layer loses the
    accuracy beyond T_train and whether the log-scaled layer-2 remedy restores it."""
    rows, delay_rows, checks = [], [], []
    for pos, c in ws.items():
        lab = LABEL[pos]
        m = metrics[pos]
        delay_rows.append({"model": f"trained {lab}", "L0": 0, "acc_end": m["acc_end"]})
        for Tt in sc.T_test:
            r = LengthResult.read(m, Tt)
            for j, (a, p) in enumerate(zip(r.bucket_acc, r.bucket_prev)):
                rows.append({"model": f"trained {lab}", "T_test": Tt, "bucket_start": j * c.eval.bucket, "acc": a,
                             "prev": p, "T_train": sc.T})
            delay_rows.append({"model": f"trained {lab}", "L0": Tt - sc.T, "acc_end": r.acc_end})
        checks.append(findings.Check(f"trained {lab}: acc_end at T_train={sc.T}", m["acc_end"], "trend only"))
    delay_df = pd.concat([delay_df, pd.DataFrame(delay_rows)], ignore_index=True)
    plots.save(induction_plots.bucket_curves(pd.DataFrame(rows)), fig_dir, "ws_length_buckets")
    plots.save(induction_plots.delay_curves(delay_df), fig_dir, "ws_delay")
    Tm = max(sc.T_test)
    ape, rpe = (LengthResult.read(metrics[pos], Tm) for pos in ("ape", "rel_bias"))
    ape_in, rpe_in = metrics["ape"]["acc_end"], metrics["rel_bias"]["acc_end"]
    checks.append(findings.trend(f"C-13 RPE keeps in-context accuracy beyond T_train (T_test={Tm}) within 0.1 of in-range",
                                 rpe.acc_end >= rpe_in - 0.1, f"{rpe.acc_end:.3f} vs {rpe_in:.3f}"))
    checks.append(findings.trend(f"C-13 APE drops toward the global-only level beyond T_train (T_test={Tm})",
                                 ape.acc_end <= 0.5 * ape_in, f"{ape.acc_end:.3f} vs {ape_in:.3f}"))
    checks.append(findings.trend("C-13 previous-token accuracy beyond T_train collapses for APE only",
                                 ape.prev_tok < rpe.prev_tok - 0.2, f"APE {ape.prev_tok:.3f}, RPE {rpe.prev_tok:.3f}"))
    text = ""
    if models is not None:
        more, text = remedy_checks(models["rel_bias"], ws["rel_bias"], sc)
        checks += more
    return findings.Family("Wang & Sato: APE vs RPE, pairs only beyond the training length",
                         ["figures/ws_length_buckets.png", "figures/ws_delay.png"], checks,
                         f"Trained at T={sc.T} (random triggers K=5, linear W_F, full loss, lr {sc.lr_ws}, {sc.steps} steps); RPE = learned "
                         "relative bias in layer 1 (lr x100). Delay plot: constructions (T_train=256) and trained models." + text)


def remedy_checks(model, cfg, sc) -> tuple[list[findings.Check], str]:
    """C-13 for the trained RPE model: layer 1 (previous-token accuracy) and layer 2 (attention mass on
    the matched keys) at T_train and beyond, then the layer-2 scores scaled by log t / log T_train."""
    df = pd.DataFrame(length_remedy(model, cfg))
    plain, scaled = df[~df.scaled].set_index("T"), df[df.scaled].set_index("T")
    T0, checks = sc.T, []
    for Tt in sc.T_test:
        p, s = plain.loc[Tt], scaled.loc[Tt]
        checks.append(findings.Check(
            f"C-13 where (RPE, T_test={Tt}): layer-1 previous-token acc. / layer-2 mass on matched keys",
            f"{plain.loc[T0, 'prev_tok']:.3f} -> {p.prev_tok:.3f} / {plain.loc[T0, 'ind_mass']:.3f} -> {p.ind_mass:.3f}",
            "trend only", note=f"at T_train={T0} -> at T_test (delayed prompts, pairs beyond T_train)"))
        checks.append(findings.trend(
            f"C-13 remedy (RPE, T_test={Tt}): layer-2 scores x log t/log T_train keep acc_end within 0.1 of in-range",
            s.acc_end >= plain.loc[T0, "acc_end"] - 0.1,
            f"{s.acc_end:.3f} (plain {p.acc_end:.3f}) vs {plain.loc[T0, 'acc_end']:.3f}",
            note=f"layer-2 mass on matched keys {s.ind_mass:.3f}"))
    text = (" C-13 remedy: SimplifiedInduction.l2_log_T multiplies the layer-2 scores at position t by "
            "max(1, log(t+1)/log T_train); it leaves every position inside the training length unchanged, so it "
            "is applied to the trained model at evaluation time.")
    return checks, text


def _last_logits(model, fams: dict) -> dict:
    """The model's last-position logits on every prompt family, computed once per model."""
    return {name: last_logits(model, f.z) for name, f in fams.items()}


def _hijack_rows(logits: dict, fams, ell, lam, mu, pi_b, name, empty) -> pd.DataFrame:
    rows = []
    for key, f in fams.items():
        df = outcome_table(f, logits[key], ell, lam, mu, pi_b, empty=empty)
        df["model"] = name
        if f.name == "distance":
            df["start"] = [int(c.split("=")[1]) for c in f.label]
        rows.append(df)
    return pd.concat(rows, ignore_index=True)


def hijack_family(st: CharStats, models: dict, sc, fig_dir: Path) -> tuple[findings.Family, pd.DataFrame]:
    """C-8 and C-14: the prompt families (query 'a') on the constructions and the trained models;
    returns the family and the per-prompt outcome table."""
    ell = centred_log_bigram(st.pi_b)
    q = int(st.encode("a")[0])
    g_cal, g_test = torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)
    L = sc.T
    starts = (16, L // 2, L + 16, 2 * L - 60)
    fam_kw = dict(per_cell=sc.per_cell, distance_L=2 * L, starts=starts, gap=sc.gap)
    cal = make_families(st.pi_b, st.pi_u, q, L, g_cal, **{**fam_kw, "distance_L": None})
    test = make_families(st.pi_b, st.pi_u, q, L, g_test, **fam_kw)
    tables, checks = [], []
    for lam in (2.0, 5.0, 10.0, 20.0):
        m = build_amt(st.pi_b, pos="rel_bias", lam=lam, basis="orthogonal", n_ctx=2 * L)
        tables.append(_hijack_rows(_last_logits(m, test), test, ell, lam, 1.0, st.pi_b, f"AMT lambda={lam:g}",
                                   "uniform"))
    for lam in (2.0, 20.0):
        m = build_amt(st.pi_b, pos="rel_bias", lam=lam, basis="random", n_ctx=2 * L)
        tables.append(_hijack_rows(_last_logits(m, test), test, ell, lam, 1.0, st.pi_b,
                                   f"calibrated AMT lambda={lam:g}", "uniform"))
    fitted, alt, counted = {}, [], []
    zc = torch.cat([cal["single"].z, cal["conflict"].z])
    for pos, model in models.items():
        lab = LABEL[pos]
        lg_cal, lg_test = last_logits(model, zc), _last_logits(model, test)
        lh, mh = fit_lambda_mu(lg_cal, zc, ell)
        rho, _ = fit_ratio_by_winners(lg_cal, zc, ell)
        fitted[lab] = (lh, mh, rho)
        tables.append(_hijack_rows(lg_test, test, ell, lh, mh, st.pi_b, f"trained {lab}", "global"))
        alt.append(_hijack_rows(lg_test, test, ell, rho, 1.0, st.pi_b, f"trained {lab}", "global"))
        counted.append((lab, *fit_count_rule(lg_cal, zc, ell), lg_test))
    hj = pd.concat(tables, ignore_index=True)
    hj_alt = pd.concat(alt, ignore_index=True)
    hj["T_train"] = L
    plots.save(induction_plots.hijack_fraction(hj[hj.family.isin(["single", "conflict"])]), fig_dir, "ws_hijack_fraction")
    plots.save(induction_plots.hijack_logprob(hj[hj.family == "single"]), fig_dir, "ws_hijack_logprob")
    plots.save(induction_plots.hijack_conflict(hj[(hj.family == "conflict") & hj.model.isin(
        ["AMT lambda=20", "calibrated AMT lambda=20", "trained RPE", "trained APE"])]), fig_dir, "ws_hijack_conflict")
    plots.save(induction_plots.hijack_distance(hj[hj.family == "distance"]), fig_dir, "ws_hijack_distance")
    agree = hj.groupby(["model", "family"])["agree"].mean()
    for (model, fam), v in agree.items():
        if model.startswith("calibrated"):
            checks.append(findings.Check(f"{model}: agreement with rule, {fam}", float(v), "reference"))
            continue
        if fam == "distance" and model == "trained APE":
            checks.append(findings.Check(f"{model}: agreement with rule, distance (WS oversight expected)",
                                       float(v), "trend only"))
            continue
        checks.append(findings.trend(f"C-14 {model}: winners agree with closed-form rule on >= 90%, {fam}",
                                     float(v) >= 0.9, float(v)))
    for lab, (lh, mh, rho) in fitted.items():
        checks.append(findings.Check(f"trained {lab}: fitted lambda_hat, mu_hat (least squares)", f"{lh:.2f}, {mh:.2f}",
                                   "trend only"))
        a = hj_alt[hj_alt.model == f"trained {lab}"].groupby("family")["agree"].mean()
        checks.append(findings.Check(
            f"trained {lab}: agreement with the rule at the best calibration ratio lambda/mu = {rho:.3g}",
            ", ".join(f"{k} {v:.2f}" for k, v in a.items()), "trend only",
            note="ratio chosen to maximise winner agreement on the calibration prompts (the best any "
                 "lambda, mu > 0 reading of the rule does there), scored on the separate test prompts"))
    checks += count_rule_checks(counted, test, ell, st.pi_b, fig_dir)
    single = hj[(hj.family == "single") & hj.model.str.startswith("AMT")]
    win_by_lam = single.groupby("model")["model_o_wins"].mean()
    lam_order = [float(win_by_lam[f"AMT lambda={x:g}"]) for x in (2.0, 5.0, 10.0, 20.0)]
    checks.append(findings.Check("C-8 in-context win rate at lambda = 2 / 5 / 10 / 20 (single successor)",
                                 " / ".join(f"{x:.2f}" for x in lam_order), "reference",
                                 "global wins almost all / global ~75% / in-context 85-100% / in-context always",
                                 source="derived", note=findings.DERIVED_NOTE))
    checks.append(findings.trend("C-8 in-context win rate rises with lambda", all(np.diff(lam_order) >= 0),
                               str([round(x, 2) for x in lam_order])))
    s5 = single[single.model == "AMT lambda=5"]
    by_pi = s5.groupby("log_pi_o")["model_o_wins"].mean()
    checks.append(findings.trend("C-8 win rate falls as pi_b(o|q) falls (lambda=5)", by_pi.iloc[0] <= by_pi.iloc[-1],
                               f"lowest pi: {by_pi.iloc[0]:.2f}, highest pi: {by_pi.iloc[-1]:.2f}"))
    by_n = s5.groupby("cell")["model_o_wins"].mean()
    checks.append(findings.trend("C-8 win rate rises with n_o (lambda=5)", by_n.get("n=4", 0) >= by_n.get("n=1", 0),
                               by_n.round(2).to_dict()))
    fam = findings.Family(
        "Wang & Sato: knowledge-hijack prompt families vs the closed-form rule",
        ["figures/ws_hijack_fraction.png", "figures/ws_hijack_logprob.png", "figures/ws_hijack_conflict.png",
         "figures/ws_hijack_distance.png", "figures/ws_lambda_n.png"], checks,
        f"Query q='a' (global favourite 'n'); pairs separated by {sc.gap} filler tokens; prompts of length {L} "
        f"(distance family {2 * L}, pairs starting at {starts}); {sc.per_cell} prompts per cell. AMT = orthogonal "
        "RPE construction (rule with uniform attention when S(q) is empty); calibrated AMT = the spec's "
        "random-basis construction (reference); trained models: rule with lambda_hat, mu_hat fitted on "
        "separate calibration prompts (S(q) empty -> global term only).")
    return fam, hj


def count_rule_checks(counted: list, test: dict, ell, pi_b, fig_dir: Path) -> list[findings.Check]:
    """C-14 (b): the count-dependent rule xi(k) = lambda(n_k) + mu log pi_b(k|q), fitted per trained
    model on the calibration prompts (``counted``: (label, lambda(n), mu, the model's logits per test
    family)), scored per family on the held-out ``test`` prompts; the fitted lambda(n) drawn as ws_lambda_n."""
    checks, curves = [], []
    for lab, lam_n, mu, logits in counted:
        agree = {}
        for name, fam in test.items():
            rule = count_rule_logits(fam.z, lam_n, mu, ell)
            agree[name] = float(outcome_table(fam, logits[name], ell, 0.0, 0.0, pi_b, rule=rule)["agree"].mean())
        curves += [{"model": f"trained {lab}", "n": n, "lambda": float(v)} for n, v in enumerate(lam_n)]
        checks.append(findings.Check(
            f"C-14(b) trained {lab}: count-dependent rule, held-out agreement per family",
            ", ".join(f"{k} {v:.2f}" for k, v in agree.items()), "trend only",
            note=f"fitted on the calibration prompts: lambda(n=1..{len(lam_n) - 1}) = "
                 + " ".join(f"{float(v):.2f}" for v in lam_n[1:]) + f", mu = {mu:.2f}"))
        if lab == "RPE":
            checks.append(findings.trend("C-14(b) trained RPE (random triggers): count-dependent rule agrees on "
                                         ">= 90% in every family", min(agree.values()) >= 0.9,
                                         f"lowest: {min(agree, key=agree.get)} {min(agree.values()):.2f}"))
    plots.save(induction_plots.lambda_by_count(pd.DataFrame(curves)), fig_dir, "ws_lambda_n")
    return checks
