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

import os
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
from ..tasks.induction import DEFAULT_DATA_PATH, TriggerBigram, load_stats
from . import induction_checks, induction_plots, induction_ws
from .scale import REQUIRED, Scale, make_scales


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


def _cfg(spec, base: dict, **flat):
    return replace(spec.make_config(base), **flat) if flat else spec.make_config(base)


def _load(store: RunStore, spec, cfg) -> dict:
    """The stored record of a finished run."""
    return store.load(run_id(spec, cfg))


def _trained(store: RunStore, spec, cfg):
    """The trained model of a finished run."""
    return load_model(cfg, store.load_weights(run_id(spec, cfg)))


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
    # without --jobs: the README-config run in-process (its steps deal their chunks to forked parts,
    # one per thread), then the batch-32 runs in one single-threaded worker per core, which keeps both
    # cores busier than two torch threads on their small products
    main_backend = backend or LocalBackend(jobs or 1)
    backend = backend or LocalBackend(jobs or os.cpu_count() or 1)
    families: list[findings.Family] = []
    timings = {}

    # ---- data and construction (no training) ------------------------------------------------
    t0 = time.perf_counter()
    families.append(induction_checks.data_family(st, sc))
    fam_c, delay_df = induction_checks.construction_family(st, sc)
    families.append(fam_c)
    timings["data+construction"] = time.perf_counter() - t0

    # ---- training runs ------------------------------------------------------------------------
    main, freeze, data_cfgs, ws, generic = training_configs(sc, data_path)
    seeded = lambda cfgs: [replace(c, seed=s) for c in cfgs for s in sc.seeds]  # noqa: E731
    t0 = time.perf_counter()
    # the rest longest first, so that the short fig. 4 runs fill the workers' tails
    reps = [run_configs(spec, seeded([main]), store, backend=main_backend, force=force, desc=f"induction[{scale}] main"),
            run_configs(spec, seeded([*ws.values(), *freeze, *generic.values(), *data_cfgs.values()]), store,
                        backend=backend, force=force, desc=f"induction[{scale}]")]
    timings["training"] = time.perf_counter() - t0

    def rec(cfg):
        return _load(store, spec, cfg)

    # ---- Birth fig. 3: probes ---------------------------------------------------------------------
    r = rec(main)["metrics"]
    cur, ev = r["curves"], r["eval_curves"]
    rows = [{"step": s, "metric": k, "value": v} for k in ("wo1", "wk1", "wk0", "wk0_64", "acc_end")
            for s, v in zip(cur["step"], cur[k])]
    rows += [{"step": s, "metric": "acc_end (test)", "value": v} for s, v in zip(ev["step"], ev["acc_end_test"])]
    rows += [{"step": sc.steps, "metric": "acc_end (test)", "value": r["acc_end"]}]
    var_rows = []
    for name, c in [("none", main)] + [(f"{n} frozen until {int(0.3 * sc.steps)}", c) for n, c in
                                       zip(("W_O2", "W_K2", "W_K1"), freeze)]:
        m = rec(c)["metrics"]
        var_rows += [{"step": s, "variant": name, "acc_end": v} for s, v in
                     zip(m["eval_curves"]["step"] + [sc.steps], m["eval_curves"]["acc_end_test"] + [m["acc_end"]])]
    plots.save(induction_plots.probe_curves(pd.DataFrame(rows), pd.DataFrame(var_rows), induction_checks.authors_points()),
               fig_dir, "birth_fig3_probes")
    first_acc = ev["acc_end_test"][0] if ev["acc_end_test"] else float("nan")
    ws_ape = rec(ws["ape"])["metrics"]
    checks = induction_checks.c10_checks(r, sc, scale) + [
        findings.Check("WS APE model (random triggers, wk1 over all tokens): first steps at 0.5",
                       ", ".join(f"{k} {findings.fmt(ws_ape.get(f't50_{k}'))}" for k in ("wo1", "wk1", "wk0_64", "wk0")),
                       "trend only", note="no spec law on this order (C-10 concerns the README config)"),
        findings.trend("C-9 acc_end at init is 0.015-0.03", 0.005 <= first_acc <= 0.04, first_acc)]
    F = int(0.3 * sc.steps)
    for n, c in zip(("W_O2", "W_K2", "W_K1"), freeze):
        m = rec(c)["metrics"]
        at_f = induction_checks.value_at(m["eval_curves"]["step"], m["eval_curves"]["acc_end_test"], F)
        checks.append(findings.Check(f"acc_end with {n} frozen until step {F}: at {F} / at {sc.steps}",
                                     f"{findings.fmt(at_f)} / {findings.fmt(m['acc_end'])}", "trend only"))
    families.append(findings.Family("Birth Fig. 3: memory-recall probes and freeze schedules",
                                  ["figures/birth_fig3_probes.png"], checks,
                                  "Simplified model, README config (K=5 fixed triggers, in-context loss, SGD momentum 0.9, "
                                  f"wd 1e-4) at batch {sc.batch} (spec 512), lr {sc.lr} (spec 0.03), d={sc.d}, T={sc.T}; "
                                  f"freeze variants at batch {sc.batch_rest}. A probe crosses 0.5 at the first logged step "
                                  "(every 5 steps) where it reaches 0.5. The C-10 rows compare with the authors' code "
                                  "(Birth's public code at the README config, seed 42), drawn as black-edged points; they are "
                                  "meant at paper scale."))

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
        return induction_checks.first_cross(summary[n], "acc_end")
    k_times = [tacc(f"K={K} random") for K in (1, 3, 5, 10)]
    checks = [findings.Check(f"final acc_end, {n}", m["acc_end"], "trend only",
                           note=f"loss_bigram {m['loss_bigram']:.2f}") for n, m in summary.items()]
    checks.append(findings.trend("C-12b more triggers -> induction head forms earlier (t50 of acc_end, K=1,3,5,10)",
                               k_times[-1] <= k_times[0], str(k_times)))
    tb, tu = tacc("K=5 bigram outputs"), tacc("K=5 random")
    checks.append(findings.Check("C-12b bigram vs uniform outputs (K=5 random): t50 of acc_end", f"{tb} vs {tu}",
                                 "trend only", note="measured direction: bigram outputs "
                                 + ("slow" if tb > tu else "speed up" if tb < tu else "do not change")
                                 + " the head's formation (the spec leaves the direction open)"))
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
    models = {p: _trained(store, spec, c) for p, c in ws.items()}
    families.append(induction_ws.length_family(ws, {p: rec(c)["metrics"] for p, c in ws.items()}, sc, fig_dir,
                                               delay_df, models))
    t0 = time.perf_counter()
    fam_h, hj = induction_ws.hijack_family(st, models, sc, fig_dir)
    families.append(fam_h)
    timings["hijack"] = time.perf_counter() - t0

    section = findings.Section(
        key="induction", title="Induction heads as associative memories (Birth of a Transformer; Wang & Sato)",
        intro=(f"Scale `{scale}`. Runs: {sum(len(r.run_ids) for r in reps)} ({sum(r.ran for r in reps)} trained now, "
               f"{sum(r.skipped for r in reps)} reused, {sum(r.failed for r in reps)} failed). Fig. 3 main run at "
               f"batch {sc.batch}, all other trainings at batch "
               f"{sc.batch_rest} (spec 512; CPU budget); see docs/induction.md for reconstructed choices."),
        families=families,
        meta=findings.run_meta(scale=scale, wall_s=round(time.perf_counter() - t_start, 1),
                             **{f"time {k} (s)": round(v, 1) for k, v in timings.items()}))
    hj.to_csv(out / "hijack_outcomes.csv", index=False)
    return section
