"""Check tables of the induction reproduction that compare with fixed numbers (specs/induction.md, Checks):
the data statistics (C-1 to C-3), the calibrated construction (C-6, C-7) and Birth's Fig. 3 probes against
the authors' code (C-10). Called by ``experiments.induction.reproduce``.

Provenance follows the spec's tags: the generator table and the C-10 curves were measured by running the
authors' code ([code-run], source "code"); the construction numbers and the text statistics are ours
([derived]): those are shown as references and the laws stated with them carry the verdicts.
"""
from __future__ import annotations

import math

import pandas as pd
import torch

from .. import findings
from ..runners.induction_probes import batch_metrics
from ..tasks.induction import TriggerBigram, delayed_batch
from ..theory.induction import build_amt
from .scale import Scale

# C-2 [code-run]: (share outs >= 1, share outs >= 2, sd of the outs >= 2 share per 2048-sequence batch)
TABLE_C2 = {(1, False): (0.0659, 0.0621, 0.0020), (1, True): (0.1566, 0.1527, 0.0043),
            (3, False): (0.1692, 0.1583, 0.0048), (3, True): (0.2436, 0.2322, 0.0006),
            (5, False): (0.2486, 0.2311, 0.0026), (5, True): (0.3118, 0.2931, 0.0022),
            (10, False): (0.3865, 0.3545, 0.0030), (10, True): (0.3972, 0.3627, 0.0067)}
C2_BATCH = 2048          # sequences per batch behind the table's sd

# C-10 [code-run]: the authors' code at the README config, seed 42, on CPU
AUTHORS_T50 = {"wk1": 10, "wo1": 155, "wk0_64": 195}          # first step at which a probe reaches 0.5
AUTHORS_WK0_250 = 0.18                                        # wk0 has not reached 0.5 by step 250
AUTHORS_ACC_END = {50: 0.23, 100: 0.31, 150: 0.36, 200: 0.65, 250: 0.89}
C10_ACC_STEPS = (100, 150, 200, 250)
C10_ORDER = ("wk1", "wo1", "wk0_64", "wk0")
WK1_NOTE = "spec: by step 30; wk1 ranks each trigger among the K triggers, as the authors' test_wk1; "


def c2_tolerance(sd_batch: float, n: int) -> float:
    """3 standard deviations of the mean share over ``n`` sequences, from the sd per 2048-sequence batch."""
    return 3 * sd_batch / math.sqrt(n / C2_BATCH)


def data_family(st, sc: Scale) -> findings.Family:
    checks = [findings.compare("C-1 vocabulary size N", float(st.N), 65, 0, source="code"),
              findings.compare("C-1 characters", float(st.n_chars), 1_115_394, 0, source="derived"),
              findings.compare("C-1 pairs", float(st.bigram_counts.sum()), 1_115_393, 0, source="derived"),
              findings.compare("C-1 pi_u(space)", float(st.pi_u[1]), 0.1523, 5e-5, source="derived"),
              findings.trend("C-1 top-5 unigrams = space e t o a", [st.chars[i] for i in st.top_tokens(5)] == list(" etoa"),
                             "".join(st.chars[i] for i in st.top_tokens(5)).replace(" ", "␣")),
              findings.trend("C-1 fixed K=5 trigger ids {1,43,58,53,39}", st.top_tokens(5).tolist() == [1, 43, 58, 53, 39],
                             str(st.top_tokens(5).tolist()), "[1, 43, 58, 53, 39]", source="code"),
              findings.compare("C-1 pi_u-weighted entropy of pi_b (nats)", st.bigram_entropy(), 2.4526, 1e-4,
                               source="derived")]
    n = sc.data_seqs * 4
    for (K, fixed), (_, r2, sd) in TABLE_C2.items():
        ds = TriggerBigram(st, 256, K, fixed)
        b = ds.sample(n, torch.Generator().manual_seed(1000 + K))
        s2 = float((b.outs >= 2).float().mean())
        tol = c2_tolerance(sd, n)
        checks.append(findings.compare(f"C-2 share outs>=2, K={K} {'fixed' if fixed else 'random'}", s2, r2, round(tol, 4),
                                       note=f"n = {n} seqs; tol = 3 sd of the mean = 3 x {sd} / sqrt({n}/{C2_BATCH}) "
                                            f"= {tol:.4f}", source="code"))
    ds = TriggerBigram(st, 256, 3, False)
    b = ds.sample(sc.data_seqs, torch.Generator().manual_seed(7))
    m = b.outs == 0
    ce = float(-torch.log(st.pi_b[b.x[m], b.y[m]]).mean())
    checks.append(findings.compare("C-3 true-bigram CE at outs=0 (K=3 random)", ce, 2.319, 0.03, source="derived"))
    return findings.Family("Data: bigram with triggers (tiny Shakespeare)", checks=checks,
                           text="Statistics computed from the text (references of ours; the trigger ids and N "
                                "follow the authors' code); generator shares over fresh sequences against the "
                                "authors' generator (Birth's public code, 4 x 2048 sequences).")


def construction_family(st, sc: Scale) -> tuple[findings.Family, pd.DataFrame]:
    """C-6 and C-7: the spec's calibrated construction. Its numbers are ours (derived): shown as
    references; the laws stated after each item carry the verdicts."""
    ds = TriggerBigram(st, 256, 3, True)
    b = ds.sample(sc.constr_seqs, torch.Generator().manual_seed(5))
    checks, delay_rows = [], []
    res = {}
    for pos, lab in (("ape", "APE"), ("rel_bias", "RPE")):
        m = build_amt(st.pi_b, pos=pos, key_tokens=ds.fixed)
        r = batch_metrics(m, b.x[None], b.y[None], b.outs[None])
        res[pos] = r
        checks.append(findings.compare(f"C-6 construction acc_end T=256 ({lab})", float(r["acc_end"]), 0.997, 0.01,
                                       source="derived"))
        checks.append(findings.compare(f"C-6 layer-1 previous-token acc ({lab})", float(r["prev_tok_all"]),
                                       0.999 if pos == "ape" else 1.0, 0.01, source="derived"))
        for L0 in (0, 256, 768):
            if L0 + 256 > 1024:
                continue
            bd = delayed_batch(ds, sc.delay_seqs, L0, torch.Generator().manual_seed(60 + L0))
            ch = max(1, 32 * 256 // (256 + L0))
            rd = batch_metrics(m, bd.x[None], bd.y[None], bd.outs[None], chunk=ch)
            # prompts where some trigger's output is itself a trigger repeat it (up to ~250 in-context
            # positions) and are copied by any context average: they dominate the pooled accuracy
            keep = ~bd.chained()
            rk = batch_metrics(m, bd.x[None, keep], bd.y[None, keep], bd.outs[None, keep], chunk=ch) if keep.any() else {}
            delay_rows.append({"model": f"construction {lab}", "L0": L0, "acc_end": float(rd["acc_end"]),
                               "prev_all": float(rd["prev_tok_all"]), "chain_prompts": int((~keep).sum()),
                               "acc_end_no_chain": float(rk.get("acc_end", float("nan")))})
    m0 = build_amt(st.pi_b, pos="rel_bias", key_tokens=ds.fixed, lam=0.0)
    r0 = batch_metrics(m0, b.x[None], b.y[None], b.outs[None])
    checks.append(findings.compare("C-6 lambda=0: acc_end (global only)", float(r0["acc_end"]), 0.022, 0.02,
                                   source="derived"))
    checks.append(findings.compare("C-6 lambda=0: bigram CE", float(r0["loss_bigram"]), 2.50, 0.1,
                                   note="ours = CE of softmax(log(pi_b+1e-3)) at outs=0", source="derived"))
    checks.append(findings.compare("C-6 lambda=20: bigram CE (diffuse layer 2)", float(res["ape"]["loss_bigram"]),
                                   5.9, 0.5, note="APE; RPE: %.2f" % float(res["rel_bias"]["loss_bigram"]),
                                   source="derived"))
    acc = {lab: float(res[pos]["acc_end"]) for pos, lab in (("ape", "APE"), ("rel_bias", "RPE"))}
    checks.append(findings.trend("C-6 law: acc_end >= 0.99 at T=256 with either encoding; lambda=0 <= 0.05",
                                 min(acc.values()) >= 0.99 and float(r0["acc_end"]) <= 0.05,
                                 f"APE {acc['APE']:.3f}, RPE {acc['RPE']:.3f}, lambda=0 {float(r0['acc_end']):.3f}"))
    ref = {("APE", 0): 0.997, ("RPE", 0): 0.997, ("APE", 256): 0.066, ("RPE", 256): 1.0,
           ("APE", 768): 0.017, ("RPE", 768): 1.0}
    by = {(r["model"].split()[-1], r["L0"]): r for r in delay_rows}
    for (lab, L0), row in by.items():
        note = (f"{sc.delay_seqs} prompts, {row['chain_prompts']} with an output that is itself a trigger; "
                f"without those: {row['acc_end_no_chain']:.3f}") if L0 > 0 else ""
        checks.append(findings.compare(f"C-7 delayed L0={L0} acc_end ({lab})", row["acc_end"], ref[lab, L0], 0.02,
                                       note=note, source="derived"))
        if lab == "APE" and L0 > 0:
            share = 256 / (256 + L0)
            checks.append(findings.trend(f"C-7 law: APE previous-token acc = share of positions in range, L0={L0}",
                                         abs(row["prev_all"] - share) <= 0.02, round(row["prev_all"], 4),
                                         round(share, 4), "tolerance 0.02 (spec)", source="derived"))
    beyond = [L0 for (lab, L0) in by if lab == "APE" and L0 > 0]
    if beyond:
        ape = max(by["APE", L0]["acc_end"] for L0 in beyond)
        rpe = min(by["RPE", L0]["acc_end"] for L0 in beyond)
        checks.append(findings.trend("C-7 pairs only beyond T_train: APE acc_end <= 0.15, RPE >= 0.95 (law)",
                                     ape <= 0.15 and rpe >= 0.95, f"APE <= {ape:.3f}, RPE >= {rpe:.3f}",
                                     "APE 0.066 / 0.017, RPE 1.0", source="derived"))
    return findings.Family("Calibrated construction: in-context accuracy and APE vs RPE (C-6, C-7)", checks=checks,
                           text="Spec's calibrated AM construction (d=256, random N(0,1/d) value maps, beta=30, "
                                "lambda=20, mu=1, fixed triggers {space,e,t}). Its numbers are ours (derived): the "
                                "rows marked reference show them beside our values; the laws are judged."
                           ), pd.DataFrame(delay_rows)


# ---------------------------------------------------------------------------------------------
def first_cross(r: dict, key: str) -> float:
    """First logged step at which probe ``key`` reached 0.5 (inf when it never did)."""
    v = r.get(f"t50_{key}")
    return float("inf") if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def value_at(steps: list[int], values: list[float], step: int) -> float | None:
    """A logged curve's value at ``step`` (the last logged step at or before it; None past the end).

    ``values[i]`` belongs to ``steps[i]``; a training-batch curve has no entry for the final step,
    so it may be one shorter than ``steps``."""
    pairs = list(zip(steps, values))
    if not pairs or step > pairs[-1][0]:
        return None
    return next(v for s, v in reversed(pairs) if s <= step)


def authors_points() -> pd.DataFrame:
    """The authors' C-10 numbers as (step, metric, value) points for the probe figure."""
    rows = [{"step": s, "metric": "acc_end", "value": v} for s, v in AUTHORS_ACC_END.items()]
    rows += [{"step": s, "metric": k, "value": 0.5} for k, s in AUTHORS_T50.items()]
    rows += [{"step": 30, "metric": "wk1", "value": 1.0}, {"step": 200, "metric": "wo1", "value": 0.97},
             {"step": 250, "metric": "wk0", "value": AUTHORS_WK0_250}]
    return pd.DataFrame(rows)


def c10_checks(r: dict, sc: Scale, scale: str) -> list[findings.Check]:
    """C-10 against the authors' code at the README config. Meant at paper scale; at other scales the run
    uses other settings, which each note says (the verdicts there are indicative only)."""
    where = ("paper scale = the README config" if scale == "paper" else
             f"{scale} scale uses other settings (d={sc.d}, T={sc.T}, batch {sc.batch}, lr {sc.lr}, {sc.steps} "
             "steps) than the README config of the authors' numbers: indicative only")
    t = {k: first_cross(r, k) for k in C10_ORDER}
    crossed = [t[k] for k in C10_ORDER[:3]]
    order_ok = all(a <= b < float("inf") for a, b in zip(crossed, crossed[1:])) and t["wk0"] >= t["wk0_64"]
    checks = [findings.trend(f"C-10 ({scale} scale) probes cross 0.5 in the authors' order wk1 -> wo1 -> wk0_64 -> wk0",
                             order_ok, " -> ".join(f"{k} {findings.fmt(t[k])}" for k in C10_ORDER),
                             "wk1 10 -> wo1 155 -> wk0_64 195 -> wk0 after 250", where, source="code")]
    for k, ref in AUTHORS_T50.items():
        # +-40% of theirs; wk1 (step 10) only needs to cross by step 30 (spec)
        tol = 20 if k == "wk1" else 0.4 * ref
        checks.append(findings.compare(f"C-10 ({scale} scale) first step with {k} >= 0.5", t[k], ref, tol,
                                       note=(WK1_NOTE if k == "wk1" else "+-40%; ") + where,
                                       source="code"))
    cur = r["curves"]
    for s in C10_ACC_STEPS:
        checks.append(findings.compare(f"C-10 ({scale} scale) acc_end at step {s}", value_at(cur["step"], cur["acc_end"], s),
                                       AUTHORS_ACC_END[s], 0.15, note=f"training batch; {where}", source="code"))
    checks.append(findings.trend(f"C-10 ({scale} scale) acc_end >= 0.9 after {sc.steps} steps (spec: within 1000)",
                                 r["acc_end"] >= 0.9, r["acc_end"], note=f"test batch; {where}"))
    return checks
