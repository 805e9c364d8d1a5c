"""LCA training speed: m=6, d=64, L=64, lr 0.01, 500 steps, batch 256.

Cases (each in a fresh process, so peak memory is per case):
  plain    one run, full-sequence forward
  count    one run, exact count-based forward (the default)
  ens10    ten seeds stacked into one batched model (count path)

Usage: python benchmarks/lca_speed.py [--threads N] [--repeat R] [--json]
Reports wall and CPU seconds per run (the best of R), seconds per seed for the ensemble, and peak
resident memory (ru_maxrss). Timings exclude interpreter start-up and imports; one warm-up run
per process is excluded too.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

BASE = {"task": {"m": 6, "L": 64}, "model": {"d_model": 64}, "optim": {"lr": 0.01, "steps": 500,
                                                                       "batch_size": 256}}


def _case(name: str, threads: int, repeat: int) -> dict:
    import torch

    from assocmem.config import merge, replace
    from assocmem.registry import get_task

    torch.set_num_threads(threads)
    spec = get_task("lca")
    path = "plain" if name == "plain" else "count"
    cfg = spec.make_config(merge(BASE, {"model": {"path": path}}))
    configs = [replace(cfg, seed=s) for s in range(10 if name == "ens10" else 1)]
    spec.run_stack([replace(cfg, **{"optim.steps": 20})])            # warm-up
    best_wall, best_cpu, acc = float("inf"), float("inf"), None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        res = spec.run_stack(configs)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        acc = sum(r.metrics["accuracy"] for r in res) / len(res)
    return {"case": name, "seeds": len(configs), "wall_s": best_wall, "cpu_s": best_cpu,
            "wall_s_per_seed": best_wall / len(configs), "accuracy": acc,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": threads}


def blas_info() -> str:
    """numpy's BLAS and the kernels it runs (the count path's products go through it)."""
    import numpy  # noqa: F401
    import threadpoolctl
    info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture', '?')})" for i in info) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(_case(args.case, args.threads, args.repeat)))
        return
    rows = []
    for name in ("plain", "count", "ens10"):
        out = subprocess.run([sys.executable, __file__, "--case", name, "--threads", str(args.threads),
                              "--repeat", str(args.repeat)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    one = next(r for r in rows if r["case"] == "count")
    ens = next(r for r in rows if r["case"] == "ens10")
    summary = {"rows": rows, "ens10_over_single": ens["wall_s"] / one["wall_s"], "blas": blas_info(),
               "plain_over_count": rows[0]["wall_s"] / one["wall_s"]}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'case':6} {'seeds':>5} {'wall s':>8} {'cpu s':>8} {'s/seed':>8} {'acc':>6} {'peak MB':>8}")
    for r in rows:
        print(f"{r['case']:6} {r['seeds']:5d} {r['wall_s']:8.3f} {r['cpu_s']:8.3f} {r['wall_s_per_seed']:8.3f} "
              f"{r['accuracy']:6.3f} {r['peak_rss_mb']:8.0f}")
    print(f"numpy BLAS: {blas_info()}")
    print(f"10-seed ensemble / one run: {summary['ens10_over_single']:.2f}x; "
          f"plain / count: {summary['plain_over_count']:.2f}x  (torch threads: {args.threads})")


if __name__ == "__main__":
    main()
