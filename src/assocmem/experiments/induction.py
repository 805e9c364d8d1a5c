"""Reproduction: Birth of a Transformer (Bietti et al. 2023) + knowledge hijack (Wang & Sato 2024).

``reproduce(out_dir, scale, jobs, force)`` runs every training through ``sweep.run_configs`` into
``RunStore(out_dir)``, computes the construction checks directly, draws the figures into
``out_dir/figures/`` and returns the report's Section (``report.write_report`` renders it).

Scales (CPU budgets):
  quick  d = 128, T = 128, 300 steps (fig. 3/4, WS models), batch 32, T_test = 256/512; prompts and
         constructions small
  paper  fig. 3 main run at the spec defaults (d = 256, T = 256, batch 512, 1000 steps, test batch 512);
         freeze variants, WS models (d = T = 256, 1000 steps) and the fig. 4 grid (d = T = 128) at
         batch 32; T_test = 512/1024
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import torch

from .. import findings, plots
from ..config import replace
from ..registry import get_task, run_id
from ..store import RunStore
from ..sweep import LocalBackend, run_configs
from ..runners.induction import load_model
from ..runners.induction_probes import batch_metrics
from ..tasks.induction import DEFAULT_DATA_PATH, TriggerBigram, delayed_batch, load_stats
from ..theory.induction import build_amt
from . import induction_plots, induction_ws
from .scale import REQUIRED, Scale, make_scales

TABLE_C2 = {(1, False): (0.066, 0.062), (1, True): (0.152, 0.148), (3, False): (0.159, 0.148),
            (3, True): (0.237, 0.225), (5, False): (0.240, 0.222), (5, True): (0.325, 0.307),
            (10, False): (0.389, 0.357), (10, True): (0.382, 0.347)}


DEFAULTS = {
    "d": REQUIRED,
    "T": REQUIRED,
    "steps": REQUIRED,
    "batch": REQUIRED,
    "eval_batch": REQUIRED,
    "T_test": REQUIRED,
    "long_batch": REQUIRED,
    "d4": REQUIRED,                  # fig. 4 grid width / length
    "T4": REQUIRED,
    "steps4": REQUIRED,
    "data_seqs": REQUIRED,           # sequences for the data checks
    "constr_seqs": REQUIRED,         # sequences for the construction checks at T = 256
    "delay_seqs": REQUIRED,
    "per_cell": REQUIRED,            # hijack prompts per cell
    "seeds": (0,),
    "generic_steps": 1500,
    "gap": 20,                       # filler tokens between inserted (q, o) pairs
    "lr": 0.03,                      # fig. 3 runs (README: 0.03 at batch 512)
    "lr4": 0.3,                      # fig. 4 grid
    "lr_ws": 0.3,                    # WS APE/RPE models (random triggers, linear W_F, full loss)
    "lr_generic": 0.003,             # spec 0.01: does not train at d = T = 64 (see docs/induction.md)
    "d_gen": 64,                     # generic model width and length (spec's Fig. 2: d = 128, T = 256; CPU budget)
    "T_gen": 64,
    "batch_gen": 64,                 # generic model batch (spec)
    "batch_rest": 32,                # freeze variants, fig. 4 grid and WS models (fig. 3 main run: ``batch``)
    "eval_every": 25,
}
SCALES = make_scales(
    DEFAULTS,
    smoke=dict(d=32, T=32, steps=20, batch=8, eval_batch=8, T_test=(64,), long_batch=4,
               d4=32, T4=32, steps4=20, data_seqs=32, constr_seqs=8, delay_seqs=2, per_cell=1,
               generic_steps=10, gap=2, d_gen=32, T_gen=32, batch_gen=8),   # pipeline test only
    quick=dict(d=128, T=128, steps=300, batch=32, eval_batch=64, T_test=(256, 512), long_batch=16,
               d4=64, T4=64, steps4=300, data_seqs=512, constr_seqs=64, delay_seqs=12, per_cell=20,
               lr=0.1, lr4=0.3, lr_ws=0.3),
    paper=dict(d=256, T=256, steps=1000, batch=512, eval_batch=512, eval_every=50, T_test=(512, 1024), long_batch=24,
               d4=128, T4=128, steps4=600, data_seqs=512, constr_seqs=256, delay_seqs=64, per_cell=20,
               lr=0.03, lr4=0.3, lr_ws=0.1),
)


def _base(sc: Scale, data_path: str) -> dict:
    return {"task": {"data_path": data_path, "T": sc.T, "K": 5, "fixed_triggers": True},
            "model": {"d_model": sc.d, "n_ctx": max(sc.T_test + (sc.T,))},
            "optim": {"batch": sc.batch, "steps": sc.steps, "log_every": 5, "lr": sc.lr},
            "eval": {"batch": sc.eval_batch, "every": sc.eval_every, "long_batch": sc.long_batch}}


def _le(a, b) -> bool:
    """a <= b for 'first step reaching 0.5' values (None/nan = never)."""
    inf = float("inf")
    a = inf if a is None or (isinstance(a, float) and math.isnan(a)) else a
    b = inf if b is None or (isinstance(b, float) and math.isnan(b)) else b
    return a <= b and a < inf


def _half_rise(steps: list[int], values: list[float]) -> float:
    """First logged step at which a curve is halfway from its initial to its final value (nan if flat)."""
    v0, v1 = values[0], values[-1]
    if not v1 > v0:
        return float("nan")
    return next((float(s) for s, v in zip(steps, values) if v >= v0 + 0.5 * (v1 - v0)), float("nan"))


def _cfg(spec, base: dict, **flat):
    return replace(spec.make_config(base), **flat) if flat else spec.make_config(base)


def _load(store: RunStore, spec, cfg) -> dict:
    """The stored record of a finished run."""
    return store.load(run_id(spec, cfg))


def _trained(store: RunStore, spec, cfg):
    """The trained model of a finished run."""
    return load_model(cfg, store.load_weights(run_id(spec, cfg)))


# ---------------------------------------------------------------------------------------------
def _data_family(st, sc: Scale) -> findings.Family:
    checks = [findings.compare("C-1 vocabulary size N", float(st.N), 65, 0),
              findings.compare("C-1 characters", float(st.n_chars), 1_115_394, 0),
              findings.compare("C-1 pairs", float(st.bigram_counts.sum()), 1_115_393, 0),
              findings.compare("C-1 pi_u(space)", float(st.pi_u[1]), 0.1523, 5e-5),
              findings.trend("C-1 top-5 unigrams = space e t o a", [st.chars[i] for i in st.top_tokens(5)] == list(" etoa"),
                           "".join(st.chars[i] for i in st.top_tokens(5)).replace(" ", "␣")),
              findings.trend("C-1 fixed K=5 trigger ids {1,43,58,53,39}", st.top_tokens(5).tolist() == [1, 43, 58, 53, 39],
                           str(st.top_tokens(5).tolist())),
              findings.compare("C-1 pi_u-weighted entropy of pi_b (nats)", st.bigram_entropy(), 2.4526, 1e-4)]
    for (K, fixed), (r1, r2) in TABLE_C2.items():
        ds = TriggerBigram(st, 256, K, fixed)
        b = ds.sample(sc.data_seqs * 4, torch.Generator().manual_seed(1000 + K))
        s2 = float((b.outs >= 2).float().mean())
        checks.append(findings.compare(f"C-2 share outs>=2, K={K} {'fixed' if fixed else 'random'}", s2, r2, 0.01,
                                     note=f"{sc.data_seqs * 4} seqs; spec = one 512-seq draw (sd up to 0.012)"))
    ds = TriggerBigram(st, 256, 3, False)
    b = ds.sample(sc.data_seqs, torch.Generator().manual_seed(7))
    m = b.outs == 0
    ce = float(-torch.log(st.pi_b[b.x[m], b.y[m]]).mean())
    checks.append(findings.compare("C-3 true-bigram CE at outs=0 (K=3 random)", ce, 2.319, 0.03))
    return findings.Family("Data: bigram with triggers (tiny Shakespeare)", checks=checks,
                         text="Statistics computed from the text; generator shares over fresh sequences.")


def _construction_family(st, sc: Scale, fig_dir: Path) -> tuple[findings.Family, pd.DataFrame]:
    ds = TriggerBigram(st, 256, 3, True)
    b = ds.sample(sc.constr_seqs, torch.Generator().manual_seed(5))
    checks, delay_rows = [], []
    res = {}
    for pos, lab in (("ape", "APE"), ("rel_bias", "RPE")):
        m = build_amt(st.pi_b, pos=pos, key_tokens=ds.fixed)
        r = batch_metrics(m, b.x[None], b.y[None], b.outs[None])
        res[pos] = r
        checks.append(findings.compare(f"C-6 construction acc_end T=256 ({lab})", float(r["acc_end"]), 0.997, 0.01))
        checks.append(findings.compare(f"C-6 layer-1 previous-token acc ({lab})", float(r["prev_tok_all"]),
                                     0.999 if pos == "ape" else 1.0, 0.01))
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
    checks.append(findings.compare("C-6 lambda=0: acc_end (global only)", float(r0["acc_end"]), 0.022, 0.02))
    checks.append(findings.compare("C-6 lambda=0: bigram CE", float(r0["loss_bigram"]), 2.50, 0.1,
                                 note="ours = CE of softmax(log(pi_b+1e-3)) at outs=0"))
    checks.append(findings.compare("C-6 lambda=20: bigram CE (diffuse layer 2)", float(res["ape"]["loss_bigram"]),
                                 5.9, 0.5, note="APE; RPE: %.2f" % float(res["rel_bias"]["loss_bigram"])))
    ref = {("APE", 0): 0.997, ("RPE", 0): 0.997, ("APE", 256): 0.066, ("RPE", 256): 1.0,
           ("APE", 768): 0.017, ("RPE", 768): 1.0}
    by = {(r["model"].split()[-1], r["L0"]): r for r in delay_rows}
    for (lab, L0), row in by.items():
        note = (f"{sc.delay_seqs} prompts, {row['chain_prompts']} with an output that is itself a trigger; "
                f"without those: {row['acc_end_no_chain']:.3f}") if L0 > 0 else ""
        checks.append(findings.compare(f"C-7 delayed L0={L0} acc_end ({lab})", row["acc_end"], ref[lab, L0], 0.02,
                                     note=note))
        if lab == "APE" and L0 > 0:
            checks.append(findings.compare(f"C-7 APE previous-token acc, L0={L0}", row["prev_all"],
                                         256 / (256 + L0), 0.02))
    beyond = [L0 for (lab, L0) in by if lab == "APE" and L0 > 0]
    if beyond:
        ape = max(by["APE", L0]["acc_end"] for L0 in beyond)
        rpe = min(by["RPE", L0]["acc_end"] for L0 in beyond)
        checks.append(findings.trend("C-7 pairs only beyond T_train: APE far below RPE (<= 0.3 vs >= 0.99)",
                                   ape <= 0.3 and rpe >= 0.99, f"APE <= {ape:.3f}, RPE >= {rpe:.3f}",
                                   "APE 0.066 / 0.017, RPE 1.0"))
    return findings.Family("Calibrated construction: in-context accuracy and APE vs RPE (C-6, C-7)", checks=checks,
                         text="Spec's calibrated AM construction (d=256, random N(0,1/d) value maps, "
                              "beta=30, lambda=20, mu=1, fixed triggers {space,e,t})."), pd.DataFrame(delay_rows)


def training_configs(sc: Scale, data_path: str = DEFAULT_DATA_PATH):
    """The training configs of a scale: (main, freeze variants, fig. 4 grid, WS models, generic models)."""
    spec = get_task("induction")
    base = _base(sc, data_path)
    main = _cfg(spec, base)
    rest = {**base, "optim": {**base["optim"], "batch": sc.batch_rest}}
    freeze = [_cfg(spec, rest, **{"optim.freeze_until": [f"{n}:{int(0.3 * sc.steps)}"]})
              for n in ("W_O2", "W_K2", "W_K1")]
    b4 = {**rest, "task": {**base["task"], "T": sc.T4}, "model": {"d_model": sc.d4, "n_ctx": sc.T4, "ffn": "linear"},
          "optim": {**rest["optim"], "steps": sc.steps4, "loss": "all", "lr": sc.lr4}}
    data_cfgs = {}
    for K in (1, 3, 5, 10):
        data_cfgs[f"K={K} random"] = _cfg(spec, b4, **{"task.K": K, "task.fixed_triggers": False})
    data_cfgs["K=5 fixed"] = _cfg(spec, b4, **{"task.fixed_triggers": True})
    data_cfgs["K=5 bigram outputs"] = _cfg(spec, b4, **{"task.fixed_triggers": False, "task.outputs": "bigram"})
    data_cfgs["K=5 fixed, OOD outputs"] = _cfg(spec, b4, **{"task.fixed_triggers": True, "task.outputs": "ood"})
    data_cfgs["K=5 random, OOD outputs"] = _cfg(spec, b4, **{"task.fixed_triggers": False, "task.outputs": "ood"})
    ws = {pos: _cfg(spec, rest, **{"task.fixed_triggers": False, "model.pos": pos, "model.ffn": "linear",
                                  "optim.loss": "all", "optim.lr": sc.lr_ws, "optim.bias_lr_mult": 100.0,
                                  "eval.T_test": list(sc.T_test)})
          for pos in ("ape", "rel_bias")}
    gen_base = {**rest, "task": {**base["task"], "T": sc.T_gen},
                "model": {"kind": "generic", "d_model": sc.d_gen, "n_ctx": sc.T_gen, "n_heads": 1},
                "optim": {**rest["optim"], "name": "adamw", "lr": sc.lr_generic, "weight_decay": 0.01, "loss": "all",
                          "steps": sc.generic_steps, "batch": sc.batch_gen}}
    generic = {"fixed": _cfg(spec, gen_base, **{"task.K": 2, "task.fixed_triggers": True}),
               "random": _cfg(spec, gen_base, **{"task.K": 3, "task.fixed_triggers": False})}
    return main, freeze, data_cfgs, ws, generic


# ---------------------------------------------------------------------------------------------
def reproduce(out_dir: str | Path, scale: str = "quick", jobs: int | None = None, force: bool = False,
              data_path: str = DEFAULT_DATA_PATH, backend=None) -> findings.Section:
    t_start = time.perf_counter()
    sc = SCALES[scale]
    out = Path(out_dir)
    fig_dir = out / "figures"
    store = RunStore(out)
    spec = get_task("induction")
    st = load_stats(data_path)
    backend = backend or LocalBackend(jobs or 1)
    families: list[findings.Family] = []
    timings = {}

    # ---- data and construction (no training) ------------------------------------------------
    t0 = time.perf_counter()
    families.append(_data_family(st, sc))
    fam_c, delay_df = _construction_family(st, sc, fig_dir)
    families.append(fam_c)
    timings["data+construction"] = time.perf_counter() - t0

    # ---- training runs ------------------------------------------------------------------------
    main, freeze, data_cfgs, ws, generic = training_configs(sc, data_path)
    all_cfgs = [main, *freeze, *data_cfgs.values(), *ws.values(), *generic.values()]
    all_cfgs = [replace(c, seed=s) for c in all_cfgs for s in sc.seeds]
    t0 = time.perf_counter()
    rep = run_configs(spec, all_cfgs, store, backend=backend, force=force, desc=f"induction[{scale}]")
    timings["training"] = time.perf_counter() - t0

    def rec(cfg):
        return _load(store, spec, cfg)

    # ---- Birth fig. 3: probes ---------------------------------------------------------------------
    r = rec(main)["metrics"]
    cur, ev = r["curves"], r["eval_curves"]
    rows = [{"step": s, "metric": k, "value": v} for k in ("wo1", "wk1", "wk0", "wk0_64")
            for s, v in zip(cur["step"], cur[k])]
    rows += [{"step": s, "metric": "acc_end (test)", "value": v} for s, v in zip(ev["step"], ev["acc_end_test"])]
    rows += [{"step": sc.steps, "metric": "acc_end (test)", "value": r["acc_end"]}]
    var_rows = []
    for name, c in [("none", main)] + [(f"{n} frozen until {int(0.3 * sc.steps)}", c) for n, c in
                                       zip(("W_O2", "W_K2", "W_K1"), freeze)]:
        m = rec(c)["metrics"]
        var_rows += [{"step": s, "variant": name, "acc_end": v} for s, v in
                     zip(m["eval_curves"]["step"] + [sc.steps], m["eval_curves"]["acc_end_test"] + [m["acc_end"]])]
    plots.save(induction_plots.probe_curves(pd.DataFrame(rows), pd.DataFrame(var_rows)), fig_dir, "birth_fig3_probes")
    first_acc = ev["acc_end_test"][0] if ev["acc_end_test"] else float("nan")
    t_wo1, t_wk1, t_wk0, t_wk064 = (r.get(f"t50_{k}") for k in ("wo1", "wk1", "wk0", "wk0_64"))
    order_ok = _le(t_wo1, t_wk1) and _le(t_wk1, t_wk0)
    th = {k: _half_rise(cur["step"], cur[k]) for k in ("wo1", "wk1", "wk0", "wk0_64")}
    checks = [findings.compare(f"C-10 acc_end after training (README config, batch {sc.batch})", r["acc_end"], 1.0, 0.1,
                             note=f"{sc.steps} steps, d={sc.d}, T={sc.T}; threshold 0.9"),
              findings.trend("C-10 probes reach 0.5 top-down: wo1 <= wk1 <= wk0", order_ok,
                           f"steps {t_wo1}, {t_wk1}, {t_wk0}"),
              findings.trend("C-10 probes rise top-down, halfway from initial to final value: wo1 <= wk1 <= wk0",
                           _le(th["wo1"], th["wk1"]) and _le(th["wk1"], th["wk0"]),
                           "steps {wo1}, {wk1}, {wk0} (wk0_64 {wk0_64}); final values {f}".format(
                               **th, f=", ".join(f"{cur[k][-1]:.2f}" for k in ("wo1", "wk1", "wk0", "wk0_64")))),
              findings.trend("C-10 wk0_64 before wk0", t_wk064 is not None and (t_wk0 is None or t_wk064 <= t_wk0),
                           f"steps {t_wk064}, {t_wk0}"),
              findings.trend("C-10 top-down order with wk1 over all tokens (WS APE model, random triggers): wo1 <= wk1",
                           _le(rec(ws["ape"])["metrics"].get("t50_wo1"), rec(ws["ape"])["metrics"].get("t50_wk1")),
                           "steps wo1 {}, wk1 {}, wk0_64 {}, wk0 {}".format(*(rec(ws["ape"])["metrics"].get(f"t50_{k}")
                                                                          for k in ("wo1", "wk1", "wk0_64", "wk0")))),
              findings.trend("C-9 acc_end at init is 0.015-0.03", 0.005 <= first_acc <= 0.04, first_acc)]
    for n, c in zip(("W_O2", "W_K2", "W_K1"), freeze):
        checks.append(findings.Check(f"acc_end with {n} frozen until step {int(0.3 * sc.steps)}",
                                   rec(c)["metrics"]["acc_end"], "trend only"))
    families.append(findings.Family("Birth Fig. 3: memory-recall probes and freeze schedules",
                                  ["figures/birth_fig3_probes.png"], checks,
                                  "Simplified model, README config (K=5 fixed triggers, in-context loss, SGD momentum 0.9, "
                                  f"wd 1e-4) at batch {sc.batch} (spec 512), lr {sc.lr} (spec 0.03), d={sc.d}, T={sc.T}; "
                                  f"freeze variants at batch {sc.batch_rest}. A probe 'rises' at the first logged step "
                                  "(every 5 steps) where it reaches 0.5."))

    # ---- Birth fig. 4: data effects -------------------------------------------------------------
    rows, summary = [], {}
    for name, c in data_cfgs.items():
        m = rec(c)["metrics"]
        cu, ec = m["curves"], m["eval_curves"]
        for k in ("loss_bigram", "loss_head", "acc_end", "ff1"):
            rows += [{"step": s, "variant": name, "metric": k, "value": v} for s, v in zip(cu["step"], cu[k])]
        rows += [{"step": s, "variant": name, "metric": "acc_end_test", "value": v}
                 for s, v in zip(ec["step"] + [sc.steps4], ec["acc_end_test"] + [m["acc_end"]])]
        summary[name] = m
        summary[name]["_t_acc"] = m.get("t50_acc_end")
    plots.save(induction_plots.data_curves(pd.DataFrame(rows)), fig_dir, "birth_fig4_data")

    def tacc(n):
        v = summary[n].get("t50_acc_end")
        return float("inf") if v is None or (isinstance(v, float) and math.isnan(v)) else v
    k_times = [tacc(f"K={K} random") for K in (1, 3, 5, 10)]
    checks = [findings.Check(f"final acc_end, {n}", m["acc_end"], "trend only",
                           note=f"loss_bigram {m['loss_bigram']:.2f}") for n, m in summary.items()]
    checks.append(findings.trend("C-12b more triggers -> induction head forms earlier (t50 of acc_end, K=1,3,5,10)",
                               k_times[-1] <= k_times[0], str(k_times)))
    checks.append(findings.trend("C-12b bigram outputs slow the head (vs uniform, K=5 random)",
                               tacc("K=5 bigram outputs") >= tacc("K=5 random"),
                               f"{tacc('K=5 bigram outputs')} vs {tacc('K=5 random')}"))
    ood_r = summary["K=5 random, OOD outputs"]["acc_end"]
    ood_f = summary["K=5 fixed, OOD outputs"]["acc_end"]
    checks.append(findings.trend("C-12b random triggers generalise to held-out outputs better than fixed",
                               ood_r >= ood_f, f"{ood_r:.3f} vs {ood_f:.3f}"))
    lb = summary["K=5 random"]["curves"]["loss_bigram"]
    checks.append(findings.trend("C-11 loss_bigram reaches 2.3-2.6 (K=5 random, W_F, full loss)",
                               min(lb) <= 2.6, round(min(lb), 3)))
    families.append(findings.Family("Birth Fig. 4: data effects (linear W_F, loss on all positions)",
                                  ["figures/birth_fig4_data.png"], checks,
                                  f"d={sc.d4}, T={sc.T4}, {sc.steps4} steps, batch {sc.batch_rest}, lr {sc.lr4}; OOD: train outputs "
                                  "ids < 48, test outputs ids >= 48 (acc_end is on the held-out outputs)."))

    # ---- Birth fig. 2: attention maps of the generic model ----------------------------------------
    maps, checks = [], []
    for name, c in generic.items():
        rc, model = rec(c), _trained(store, spec, c)
        ds = TriggerBigram(st, c.task.T, c.task.K, c.task.fixed_triggers)
        bb = ds.sample(16, torch.Generator().manual_seed(99))
        # show a sequence whose outputs are not themselves triggers (those repeat one token forever)
        keep = ~bb.chained()
        i = int(torch.nonzero(keep)[0, 0]) if keep.any() else 0
        with torch.no_grad():
            _, hk = model(bb.x[i:i + 1][None], return_hooks=True)
        outs = bb.outs[i]
        W = min(30, c.task.T)
        ic = torch.nonzero(outs >= 2)[:, 0]
        ic = ic[ic >= W - 1]                          # a full window of W positions ending at the
        end = int(ic[min(len(ic) - 1, 2)]) + 1 if len(ic) else W   # third in-context position after W
        lo = end - W
        sl = slice(lo, end)
        a1 = hk["attn1"][0, 0, 0][sl, sl].numpy()
        a2 = hk["attn2"][0, 0, 0][sl, sl].numpy()
        labels = [st.chars[int(t)].replace("\n", "\\n").replace(" ", "␣") for t in bb.x[i, sl]]
        marks = [int(j) - lo for j in torch.nonzero(outs[sl] >= 1)[:, 0] + lo]
        maps.append((f"{name} triggers", a1, a2, labels, marks))
        checks.append(findings.Check(f"generic model ({name} triggers): acc_end", rc["metrics"]["acc_end"],
                                   "trend only", note=f"layer-1 prev-token {rc['metrics']['prev_tok']:.2f}, "
                                                      f"layer-2 induction attn {rc['metrics']['ind_attn']:.2f}"))
    checks.append(findings.trend("C-12 layer-2 attends to the earlier successor (random triggers, ind_attn > 0.5)",
                               rec(generic["random"])["metrics"]["ind_attn"] > 0.5,
                               rec(generic["random"])["metrics"]["ind_attn"]))
    plots.save(induction_plots.attention_maps(maps), fig_dir, "birth_fig2_attention")
    families.append(findings.Family("Birth Fig. 2: attention maps of the generic transformer",
                                  ["figures/birth_fig2_attention.png"], checks,
                                  f"2 layers, 1 head, d={sc.d_gen}, T={sc.T_gen}, pre-LN, AdamW lr {sc.lr_generic}, batch {sc.batch_gen}, {sc.generic_steps} steps; "
                                  "red ticks: trigger positions."))

    # ---- Wang & Sato: APE vs RPE, knowledge hijack ------------------------------------------------
    families.append(induction_ws.length_family(ws, {p: rec(c)["metrics"] for p, c in ws.items()}, sc, fig_dir,
                                               delay_df))
    t0 = time.perf_counter()
    models = {p: _trained(store, spec, c) for p, c in ws.items()}
    fam_h, hj = induction_ws.hijack_family(st, models, sc, fig_dir)
    families.append(fam_h)
    timings["hijack"] = time.perf_counter() - t0

    section = findings.Section(
        key="induction", title="Induction heads as associative memories (Birth of a Transformer; Wang & Sato)",
        intro=(f"Scale `{scale}`. Runs: {len(rep.run_ids)} ({rep.ran} trained now, {rep.skipped} reused, "
               f"{rep.failed} failed). Fig. 3 main run at batch {sc.batch}, all other trainings at batch "
               f"{sc.batch_rest} (spec 512; CPU budget); see docs/induction.md for reconstructed choices."),
        families=families,
        meta=findings.run_meta(scale=scale, wall_s=round(time.perf_counter() - t_start, 1),
                             **{f"time {k} (s)": round(v, 1) for k, v in timings.items()}))
    hj.to_csv(out / "hijack_outcomes.csv", index=False)
    return section
