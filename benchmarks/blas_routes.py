"""The default BLAS route against both forced routes, side by side in one run.

Runs the LCA smoke setting (``lca_speed.py --case count``, one run) and one single-threaded induction
training step (``induction_speed.py --threads 1 --modes fast``) in fresh processes with
``ASSOCMEM_BLAS=numpy``, ``ASSOCMEM_BLAS=torch`` and unset (the measured default), in --rounds rounds
whose order rotates, so a machine that drifts weighs on every route alike. Prints the best and the
median seconds per route and how far the default is from the faster forced route.

    python benchmarks/blas_routes.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROUTES = ("numpy", "torch", "default")


def _env(route: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ASSOCMEM_BLAS", None)
    if route != "default":
        env["ASSOCMEM_BLAS"] = route
    return env


def _lca(route: str) -> float:
    out = subprocess.run([sys.executable, str(HERE / "lca_speed.py"), "--case", "count", "--repeat", "3"],
                         env=_env(route), check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["wall_s"]


def _induction(route: str) -> float:
    out = subprocess.run([sys.executable, str(HERE / "induction_speed.py"), "--threads", "1", "--modes", "fast",
                          "--reps", "2"], env=_env(route), check=True, capture_output=True, text=True).stdout
    return float(re.search(r"fast\s+([\d.]+) s wall", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    default = subprocess.run([sys.executable, "-c", "from assocmem import blas; print(blas.route())"],
                             env=_env("default"), check=True, capture_output=True, text=True).stdout.strip()
    times: dict[str, dict[str, list[float]]] = {b: {r: [] for r in ROUTES} for b in ("lca", "induction")}
    for k in range(a.rounds):
        order = ROUTES[k % 3:] + ROUTES[:k % 3]
        for route in order:
            times["lca"][route].append(_lca(route))
            times["induction"][route].append(_induction(route))
        print(f"round {k + 1}: " + ", ".join(f"{b} {r} {times[b][r][-1]:.3f} s" for b in times for r in order),
              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
    print(f"default route on this machine: {default}")
    for bench, by_route in times.items():
        best = {r: min(v) for r, v in by_route.items()}
        med = {r: statistics.median(v) for r, v in by_route.items()}
        fastest = min(best["numpy"], best["torch"])
        print(f"{bench:9s} best " + " / ".join(f"{r} {best[r]:.3f}" for r in ROUTES)
              + "  median " + " / ".join(f"{r} {med[r]:.3f}" for r in ROUTES)
              + f"  default vs faster forced route: {100 * (best['default'] / fastest - 1):+.1f}% (best), "
              f"{100 * (med['default'] / min(med['numpy'], med['torch']) - 1):+.1f}% (median)")


if __name__ == "__main__":
    main()
