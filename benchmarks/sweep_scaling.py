"""Sweep throughput: runs/s for a 64-run LCA grid (m in {5, 6} x L in {32, 64} x 16 seeds, d = 32),
and stacking's speed-up on a 10-seed grid of the foundation's smoke setting (m=6, L=64, d=64,
lr 0.01, 500 steps).

Configurations: local backend with 1 and 2 worker processes, seed stacking off and on, and a local
Ray instance (2 CPUs) with stacking on and off. Each configuration writes a fresh store in a temp
folder; wall times include worker start-up and store writes.

Usage: python benchmarks/sweep_scaling.py [--steps 200] [--skip-ray] [--json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from assocmem.store import RunStore
from assocmem.sweep import LocalBackend, expand_grid, make_backend, run_configs


def grid(steps: int) -> dict:
    return {"task": "lca",
            "base": {"model.d_model": 32, "optim.steps": steps, "eval.n_eval": 1024},
            "grid": {"task.m": [5, 6], "task.L": [32, 64], "seed": list(range(16))}}


def ten_seeds(steps: int = 500) -> dict:
    return {"task": "lca",
            "base": {"task.m": 6, "task.L": 64, "model.d_model": 64, "optim.lr": 0.01, "optim.steps": steps},
            "grid": {"seed": list(range(10))}}


def measure(name: str, backend, stack: bool, spec: dict) -> dict:
    task, configs = expand_grid(spec)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rep = run_configs(task, configs, RunStore(tmp), backend=backend, stack=stack, progress=False)
        wall = time.perf_counter() - t0
    assert rep.failed == 0 and rep.ran == len(configs)
    return {"config": name, "runs": len(configs), "wall_s": wall, "runs_per_s": len(configs) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [
        measure("local, 1 process, unstacked", LocalBackend(1), False, grid(args.steps)),
        measure("local, 1 process, stacked", LocalBackend(1), True, grid(args.steps)),
        measure("local, 2 processes, unstacked", LocalBackend(2), False, grid(args.steps)),
        measure("local, 2 processes, stacked", LocalBackend(2), True, grid(args.steps)),
    ]
    rows += [
        measure("10-seed grid, 1 process, unstacked", LocalBackend(1), False, ten_seeds()),
        measure("10-seed grid, 1 process, stacked", LocalBackend(1), True, ten_seeds()),
    ]
    if not args.skip_ray:
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        rows.append(measure("ray (local, 2 CPUs), stacked", make_backend("ray"), True, grid(args.steps)))
        rows.append(measure("ray (local, 2 CPUs), unstacked", make_backend("ray"), False, grid(args.steps)))
        ray.shutdown()
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'configuration':38} {'runs':>5} {'wall s':>8} {'runs/s':>8}")
    for r in rows:
        print(f"{r['config']:38} {r['runs']:5d} {r['wall_s']:8.2f} {r['runs_per_s']:8.2f}")
    by = {r["config"]: r["wall_s"] for r in rows}
    for what in ("local, 1 process", "local, 2 processes", "10-seed grid, 1 process"):
        print(f"stacking speed-up, {what}: {by[what + ', unstacked'] / by[what + ', stacked']:.2f}x")


if __name__ == "__main__":
    main()
