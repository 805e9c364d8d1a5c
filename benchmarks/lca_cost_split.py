"""Where the time of a stacked LCA run goes: fixed cost vs cost per member.

The smoke setting of benchmarks/lca_speed.py (m=6, d=64, L=64, lr 0.01, 500 steps, batch 256) is
trained single-threaded as a stack of S = 1 and S = S_BIG members (the way each forked half of a
10-seed ensemble runs). Each run's wall time is split into:
  sampling   drawing and counting the training batches (runners.lca.count_batches)
  products   the matrix products of the training step (blas.matmul -> numpy's BLAS)
  step rest  the rest of count_loss_backward (softmaxes, gathers, scatters, element-wise passes)
  optimiser  the AdamW update
  eval+init  model init, evaluation on 4096 fresh sequences, result assembly
A two-point fit T(S) = F + S m gives each part's fixed cost F and per-member cost m. A 10-seed
ensemble runs as two forked halves of 5, so its wall time is at least F + 5 m and the ratio
10-seed / one run is at least (F + 5 m) / (F + m): below 3 only if m < F.

Usage: python benchmarks/lca_cost_split.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time

S_BIG = 5
PARTS = ("sampling", "products", "step rest", "optimiser", "eval+init")


def _case(S: int, repeat: int) -> dict:
    import torch
    torch.set_num_threads(1)
    from assocmem import blas, training
    from assocmem.config import replace
    from assocmem.models.lca import LCAModel
    from assocmem.registry import get_task
    from assocmem.runners import lca as R

    T = collections.defaultdict(float)
    in_step = [False]

    def timed(name, fn, only_in_step=False):
        def wrapper(*a, **k):
            if only_in_step and not in_step[0]:
                return fn(*a, **k)
            t = time.perf_counter()
            out = fn(*a, **k)
            T[name] += time.perf_counter() - t
            return out
        return wrapper

    def training_step(fn):
        timed_fn = timed("step", fn)

        def wrapper(*a, **k):
            in_step[0] = True
            try:
                return timed_fn(*a, **k)
            finally:
                in_step[0] = False
        return wrapper

    batches = R.count_batches

    def count_batches(*a, **k):           # time each next() of the generator
        it = batches(*a, **k)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            T["sampling"] += time.perf_counter() - t
            yield item

    R.count_batches = count_batches
    blas._np_matmul = timed("products", blas._np_matmul, only_in_step=True)   # not evaluation's
    LCAModel.count_loss_backward = training_step(LCAModel.count_loss_backward)
    training.Optimizer.step = timed("optimiser", training.Optimizer.step)
    cfg = get_task("lca").make_config({"task": {"m": 6, "L": 64}, "model": {"d_model": 64},
                                       "optim": {"lr": 0.01, "steps": 500, "batch_size": 256}})
    R._run_stack([replace(cfg, **{"optim.steps": 20})])                     # warm-up
    best = None
    for _ in range(repeat):
        T.clear()
        t0 = time.perf_counter()
        R._run_stack([replace(cfg, seed=s) for s in range(S)])
        wall = time.perf_counter() - t0
        parts = {"sampling": T["sampling"], "products": T["products"], "step rest": T["step"] - T["products"],
                 "optimiser": T["optimiser"]}
        parts["eval+init"] = wall - sum(parts.values())
        if best is None or wall < best["wall"]:
            best = {"S": S, "wall": wall, **parts}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(_case(args.case, args.repeat)))
        return
    one, big = (json.loads(subprocess.run([sys.executable, __file__, "--case", str(S), "--repeat", str(args.repeat)],
                                          check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                for S in (1, S_BIG))
    rows = []
    for part in PARTS + ("wall",):
        m = (big[part] - one[part]) / (S_BIG - 1)
        rows.append({"part": part, "S=1": one[part], f"S={S_BIG}": big[part], "fixed": one[part] - m, "per_member": m})
    F, m = rows[-1]["fixed"], rows[-1]["per_member"]
    summary = {"rows": rows, "floor_ratio_10_over_1": (F + S_BIG * m) / (F + m)}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'part':10} {'S=1 s':>8} {f'S={S_BIG} s':>8} {'fixed s':>8} {'per member s':>13}")
    for r in rows:
        print(f"{r['part']:10} {r['S=1']:8.3f} {r[f'S={S_BIG}']:8.3f} {r['fixed']:8.3f} {r['per_member']:13.3f}")
    print(f"10-seed ensemble / one run is at least (F + {S_BIG} m) / (F + m) = {summary['floor_ratio_10_over_1']:.2f}x "
          f"(two forked halves of {S_BIG}, before fork and result transfer)")


if __name__ == "__main__":
    main()
