"""Where a trained induction model loses in-context accuracy beyond its training length, and whether
scaling its layer-2 scores by log t / log T_train (``SimplifiedInduction.l2_log_T``) restores it (C-13).

The model is evaluated on the runner's own long test batches (delayed prompts: no trigger in the first
T_test - T_train positions, eval stream seed + T_test), so the plain rows equal the run's stored
``LengthResult`` metrics.
"""
from __future__ import annotations

import torch

from ..models.induction import SimplifiedInduction
from ..runners.induction import InductionConfig, make_dataset
from ..runners.induction_probes import batch_metrics
from ..tasks.induction import delayed_batch


@torch.no_grad()
def length_remedy(model: SimplifiedInduction, cfg: InductionConfig) -> list[dict]:
    """Rows {T, scaled, acc_end, prev_tok, ind_mass} for T = T_train and every ``eval.T_test``, with
    layer-2 scores plain (scaled False) and times max(1, log(t+1)/log T_train) (scaled True).
    At T_train itself both agree (the scale is 1 there); it is evaluated on the delayed generator
    with no delay."""
    ds = make_dataset(cfg, "test" if cfg.task.outputs == "ood" else "train")
    seeds = cfg.seeds.resolve(cfg.seed)
    T0, rows = cfg.task.T, []
    old = model.l2_log_T
    try:
        for Tt in (T0, *cfg.eval.T_test):
            b = delayed_batch(ds, cfg.eval.long_batch, Tt - T0, torch.Generator().manual_seed(seeds.eval + Tt))
            for scaled in (False, True):
                model.l2_log_T = T0 if scaled else 0
                r = batch_metrics(model, b.x[None], b.y[None], b.outs[None],
                                  chunk=max(1, cfg.eval.chunk * T0 // Tt), bucket=cfg.eval.bucket)
                rows.append({"T": Tt, "scaled": scaled, "acc_end": float(r["acc_end"][0]),
                             "prev_tok": float(r["prev_tok_all"][0]), "ind_mass": float(r["ind_mass"][0])})
    finally:
        model.l2_log_T = old
    return rows
