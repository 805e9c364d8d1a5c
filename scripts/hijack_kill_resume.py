"""Acceptance check for the hijack results store: SIGKILL a scoring run at three different moments,
rerun it each time, and compare the final per-record table with an uninterrupted run's, row for row.

    nice -n 5 .venv/bin/python scripts/hijack_kill_resume.py --model smollm2-135m --n 300 --k 0..5

Moments (from outside, like a user or an OOM killer would): (1) shortly after the run created its
store entry (model loaded, first chunk being scored), (2) right after the 4th chunk was committed,
plus a random delay, (3) after the 10th chunk, plus a random delay. After each kill it records the
committed records and any temp leftovers; the next run must clean those and resume. Prints one JSON
report; exit status 0 when the tables are equal and no temp file remains.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

RUN = "import sys; from assocmem.cli import main; sys.exit(main(sys.argv[1:]))"


def score_cmd(args, out: Path) -> list[str]:
    return [sys.executable, "-c", RUN, "hijack", "score", "--model", args.model, "--n", str(args.n), "--k", args.k,
            "--chunk", str(args.chunk), "--threads", str(args.threads), "--out", str(out), "--json"]


def chunks(out: Path) -> list[Path]:
    return sorted(out.glob("scores/*/chunk-*.parquet"))


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith("."))


def kill_when(args, out: Path, ready, delay: float) -> dict:
    """Start a run, wait until ``ready()`` holds, sleep ``delay`` s, SIGKILL it; what it left behind."""
    t0 = time.time()
    proc = subprocess.Popen(score_cmd(args, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return {"killed_after_s": round(time.time() - t0, 1), "exited_before_kill": finished_first,
            "committed_chunks": len(chunks(out)), "leftovers": leftovers(out)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--k", default="0..5")
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill delays")
    p.add_argument("--out", default="/tmp/assocmem-kill-resume")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out)
    ref_out, run_out = root / "ref", root / "run"
    for d in (ref_out, run_out):
        if d.exists():
            import shutil
            shutil.rmtree(d)
    report: dict = {"command": " ".join(score_cmd(args, run_out)[3:]), "kills": []}

    t0 = time.time()
    ref = subprocess.run(score_cmd(args, ref_out), capture_output=True, text=True, check=True)
    report["uninterrupted_s"] = round(time.time() - t0, 1)
    ref_res = json.loads(ref.stdout.strip().splitlines()[-1])

    moments = [("entry created + 1.5 s", lambda: any(run_out.glob("scores/*/spec.json")), 1.5),
               (">= 4 chunks + random", lambda: len(chunks(run_out)) >= 4, rng.uniform(0, 1.0)),
               (">= 10 chunks + random", lambda: len(chunks(run_out)) >= 10, rng.uniform(0, 1.0))]
    for name, ready, delay in moments:
        rec = kill_when(args, run_out, ready, delay)
        report["kills"].append({"moment": name, "delay_s": round(delay, 2), **rec})
        print(json.dumps(report["kills"][-1]), file=sys.stderr)

    t0 = time.time()
    fin = subprocess.run(score_cmd(args, run_out), capture_output=True, text=True, check=True)
    report["final_run_s"] = round(time.time() - t0, 1)
    res = json.loads(fin.stdout.strip().splitlines()[-1])
    a, b = pd.read_parquet(ref_res["table"]), pd.read_parquet(res["table"])
    try:
        pd.testing.assert_frame_equal(a, b)
        equal = True
    except AssertionError as e:
        equal, report["difference"] = False, str(e)[:500]
    done = json.loads((Path(res["entry"]) / "done.json").read_text())
    report.update(same_id=ref_res["id"] == res["id"], rows=len(b), records=done["records"],
                  duplicates=int(b.duplicated(["case_id", "k", "kind", "prompt_index"]).sum()),
                  tables_equal=equal, leftovers_after=leftovers(run_out), es_ref=ref_res["es"], es_resumed=res["es"])
    print(json.dumps(report, indent=1))
    ok = equal and report["same_id"] and not report["leftovers_after"] and report["duplicates"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
