"""A sweep driver under signals and beside other sweeps (issue 18): workers die with the driver
(kill -9 included), Ctrl-C stores what finished and says how many, a dead worker's job is retried,
and several sweeps of one grid into one store agree. Process trees are read from /proc (Linux)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from assocmem.store import RunStore

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# 60 lca runs, one job each (--no-stack): each takes a noticeable fraction of a second
TINY = {"task.m": 3, "task.L": 8, "model.d_model": 8, "optim.steps": 30, "optim.batch_size": 16,
        "eval.n_eval": 256}


def write_grid(path: Path, seeds: int, **extra) -> Path:
    path.write_text(yaml.safe_dump({"task": "lca", "base": {**TINY, **extra}, "grid": {"seed": list(range(seeds))}}))
    return path


def sweep_cmd(grid: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "assocmem.cli", "sweep", str(grid), "--out", str(out), "--no-stack", *extra]


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a live process, None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (st := _stat(int(p.name))):
            parents[int(p.name)] = st[0]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pids) -> set[int]:
    return {p for p in pids if (st := _stat(p)) and st[1] not in "ZX"}


def n_runs(out: Path) -> int:
    runs = out / "runs"
    return len([p for p in runs.iterdir() if not p.name.startswith(".")]) if runs.exists() else 0


def wait_for(cond, timeout=60.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def started(tmp_path, seeds=60, jobs="2", min_runs=2):
    """A --jobs sweep subprocess (own session) with workers up and ``min_runs`` runs stored."""
    out = tmp_path / "out"
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive
    # shell (nohup ... &) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(sweep_cmd(write_grid(tmp_path / "g.yaml", seeds), out, "--jobs", jobs),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    kids: set[int] = set()

    def ready():
        kids.update(descendants(proc.pid))
        return n_runs(out) >= min_runs
    assert wait_for(ready, proc=proc), proc.communicate()
    kids.update(descendants(proc.pid))
    return proc, out, kids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_driver_takes_its_workers_along(tmp_path, sig):
    proc, out, kids = started(tmp_path)
    assert len(kids) >= 2                        # two workers (and multiprocessing's resource tracker)
    os.kill(proc.pid, sig)
    proc.wait()
    assert wait_for(lambda: not alive(kids), timeout=5.0), f"still alive 5 s later: {alive(kids)}"
    assert n_runs(out) < 60


@pytest.mark.parametrize("target,jobs", [("driver", "2"), ("group", "2"), ("group", "1")])
def test_ctrl_c_stores_finished_runs_and_says_how_many(tmp_path, target, jobs):
    """kill -INT <driver>, or Ctrl-C in a terminal (the whole process group)."""
    proc, out, kids = started(tmp_path, jobs=jobs, min_runs=3)
    if target == "driver":
        os.kill(proc.pid, signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    m = re.search(r"interrupted: stored (\d+) of (\d+) runs; rerun to continue", err)
    assert m, err
    stored, total = int(m[1]), int(m[2])
    assert total == 60 and stored == n_runs(out) >= 3
    assert "finished runs are stored" not in err
    assert len(pd.read_parquet(out / "runs.parquet")) == stored      # the table caught up
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]
    assert wait_for(lambda: not alive(kids), timeout=5.0), alive(kids)
    if target != "driver":
        return
    # rerun completes the rest
    p = subprocess.run(sweep_cmd(tmp_path / "g.yaml", out), capture_output=True, text=True)
    assert p.returncode == 0 and f"60 runs: {60 - stored} ran, {stored} already finished" in p.stdout


@pytest.mark.slow
def test_dead_worker_is_retried_and_the_sweep_goes_on(tmp_path):
    proc, out, kids = started(tmp_path, seeds=20, min_runs=1)
    workers = [k for k in alive(kids)
               if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()
               and _stat(k)[0] == proc.pid]
    assert workers
    os.kill(workers[0], signal.SIGKILL)         # as the OOM killer would
    so, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenProcessPool" not in err, err
    store = RunStore(out)
    ids = store.run_ids()
    assert len(ids) == 20
    statuses = [store.load(r)["status"] for r in ids]
    errors = [store.load(r)["error"] for r in ids if store.load(r)["status"] == "error"]
    assert all("worker died" in e for e in errors)
    assert proc.returncode == (1 if errors else 0), (so, err)
    assert statuses.count("ok") + len(errors) == 20
    assert len(pd.read_parquet(out / "runs.parquet")) == 20


@pytest.mark.slow
def test_concurrent_sweeps_of_one_grid_into_one_store(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", 8, **{"optim.steps": 10, "eval.n_eval": 64})
    out = tmp_path / "out"
    procs = [subprocess.Popen(sweep_cmd(grid, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
    store = RunStore(out)
    ids = store.run_ids()
    assert len(ids) == 8 and all(store.load(r)["status"] == "ok" for r in ids)
    assert not [p.name for p in (out / "runs").iterdir() if p.name.startswith(".")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    df = pd.read_parquet(out / "runs.parquet")
    assert len(df) == 8 and sorted(df["run_id"]) == ids


CRASHY = '''
import dataclasses, os, signal
from assocmem.runners import lca

def run_stack(configs):
    if configs[0].seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)      # this job always kills its worker (as OOM would)
    return lca.run_stack(configs)

SPEC = dataclasses.replace(lca.SPEC, name="crashy", run_stack=run_stack)
'''


@pytest.mark.slow
def test_job_that_always_kills_its_worker_is_recorded_failed_alone(tmp_path, monkeypatch, capsys):
    from assocmem import registry
    from assocmem.sweep import LocalBackend, expand_grid, run_configs

    (tmp_path / "crashy_task.py").write_text(CRASHY)
    monkeypatch.syspath_prepend(str(tmp_path))            # spawned workers get the driver's sys.path
    monkeypatch.setitem(registry.TASKS, "crashy", "crashy_task:SPEC")
    task, cfgs = expand_grid({"task": "crashy", "base": {**TINY, "optim.steps": 5, "eval.n_eval": 64},
                              "grid": {"seed": [0, 1, 2, 3]}})
    store = RunStore(tmp_path / "out")
    rep = run_configs(task, cfgs, store, backend=LocalBackend(2), stack=False, progress=False)
    recs = {c.seed: store.load(registry.run_id(task, c)) for c in cfgs}
    assert {s: r["status"] for s, r in recs.items()} == {0: "ok", 1: "error", 2: "ok", 3: "ok"}
    assert recs[1]["error"].startswith("worker died") and rep.failed == 1 and rep.stored == 4
    assert "a worker process died" in capsys.readouterr().err


FORKER = '''
import sys, time
from assocmem.training import ForkedCall
child = ForkedCall(lambda s: time.sleep(s), 60)     # a run's forked helper, busy for a minute
print(child.pid, flush=True)
time.sleep(60)
'''


def test_forked_helper_dies_with_its_parent_on_kill_9(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert alive([child])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert wait_for(lambda: not alive([child]), timeout=5.0)
