"""Speed of a full-batch geometric training step, fused loss against the plain reference, side by
side in one run: the paper-scale E6 cell that costs the most (N = 256, R = 3, k = 3 hops with CoT,
slot format, 3 heads, d = 6, 2 stacked seeds; 6912 chains, 3 answer positions, 256 answers).

Both modes start from the same model, trained ``--warm`` steps first: early in training the logits
are close together, while late most of them sit far below their row's maximum, which is where
``exp`` and denormal products used to take the CPU's slow path (``models.geometric.EXP_FLOOR``).

  fused  ``runners.geometric.train(fused=True)``: ``UnembedCrossEntropy`` (what training runs)
  plain  ``train(fused=False)``: ``model(...)`` logits and ``F.cross_entropy`` (the reference)

Usage: python benchmarks/geometric_speed.py [--threads 2] [--warm 300] [--steps 20] [--d 6]

Prints seconds per step of each mode (mean over --steps after --warm, same starting weights).
2026-12-06 21:59, 2-core Intel Xeon, idle, defaults (--threads 2, after 300 steps): fused 0.123 s, plain
0.316 s per step, the same loss (1.2969). The fused path before protocol geometric-3 (batched logits,
max with indices, no floor under exp) took about 0.35 s per step there.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time

import torch

from assocmem.experiments.geometric_common import SCALES, _optim, make_cfg
from assocmem.runners.geometric import build_model, make_data, train, trainable_names


def setup(d: int):
    flat = {"task.N": 256, "task.R": 3, "task.format": "slots", "task.k": 3, "task.K": 3, "task.cot": True,
            "model.d_model": d, "model.n_heads": 3, **_optim(SCALES["paper"])}
    cfgs = [make_cfg(**flat, seed=s) for s in range(2)]
    seeds = [c.seeds.resolve(c.seed) for c in cfgs]
    datas = [make_data(c, s) for c, s in zip(cfgs, seeds)]
    model = build_model(cfgs[0], len(cfgs), datas[0])
    for i, s in enumerate(seeds):
        model.init_instance(i, torch.Generator().manual_seed(s.init), None, cfgs[0].model.w2_scale)
    tokens = torch.stack([x.tokens for x in datas])
    targets = torch.stack([x.targets for x in datas])
    return cfgs[0], model, tokens, targets, datas[0].out_pos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm", type=int, default=300, help="training steps before timing")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--d", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    c, model, tokens, targets, out_pos = setup(a.d)
    names = trainable_names(c.model)
    run = lambda m, steps, fused: train(m, tokens, targets, out_pos,  # noqa: E731
                                        dataclasses.replace(c.optim, max_steps=steps, stop="none", patience=0),
                                        names, fused=fused)
    if a.warm:
        run(model, a.warm, True)
    print(f"E6 CoT cell, d = {a.d}, tokens {list(tokens.shape)}, after {a.warm} steps, {a.threads} thread(s)")
    for name, fused in (("fused", True), ("plain", False)):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        tr = run(m, a.steps, fused)
        dt = (time.perf_counter() - t0) / a.steps
        print(f"{name:6s} {dt:6.3f} s per step  (loss {tr['loss'][0]:.4f}, load average {os.getloadavg()[0]:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
