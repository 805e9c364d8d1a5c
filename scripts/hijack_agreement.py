"""C-14 for stored induction runs: how often a trained model's winner agrees with the closed-form rule.

    python scripts/hijack_agreement.py STORE [--threads 2]

For every finished induction run (simplified model) in the store: the knowledge-hijack prompt
families of the report (query 'a', prompts of length T_train, 20 per cell), lambda_hat and mu_hat
fitted on separate calibration prompts, and the agreement per family and per cell. Uses the same
functions as `assocmem reproduce induction` (experiments.induction_ws.hijack_family).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from assocmem.experiments import induction as ind, induction_ws as ws
from assocmem.registry import get_task
from assocmem.runners.induction import load_model
from assocmem.store import RunStore
from assocmem.tasks.induction import load_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", help="folder of a run store (the --out of `assocmem run/sweep/reproduce`)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store, spec = RunStore(args.store), get_task("induction")
    stats = {}
    for rid in store.run_ids():
        rec = store.load(rid)
        if rec.get("task") != "induction" or rec.get("status") != "ok":
            continue
        cfg = spec.make_config(rec["config"])
        if cfg.model.kind != "simplified":
            continue
        path = cfg.task.data_path
        st = stats.setdefault(path, load_stats(path))
        sc = ind.SCALES["quick"].replace(T=cfg.task.T)
        with tempfile.TemporaryDirectory() as figs:
            fam, hj = ws.hijack_family(st, {cfg.model.pos: load_model(cfg, store.load_weights(rid))}, sc, figs)
        t = hj[hj.model.str.startswith("trained")]
        print(f"{rid}  fixed_triggers={cfg.task.fixed_triggers} outputs={cfg.task.outputs} pos={cfg.model.pos} "
              f"T={cfg.task.T} steps={cfg.optim.steps}  acc_end {rec['metrics']['acc_end']:.3f}")
        for c in fam.checks:
            if c.name.startswith("trained") and "least squares" in c.name:
                print(f"  lambda_hat, mu_hat: {c.ours}")
        for name, v in t.groupby("family")["agree"].mean().items():
            cells = t[t.family == name].groupby("cell")["agree"].mean()
            print(f"  {name:9s} {v:.2f}   " + ", ".join(f"{k} {x:.2f}" for k, x in cells.items()))


if __name__ == "__main__":
    main()
