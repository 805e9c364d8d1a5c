"""Run store and sweeps: atomic writes, resume, failure recording, SIGKILL safety."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import assocmem.runners.lca as lca_runner
from assocmem.registry import RunResult, get_task, run_id
from assocmem.store import RunStore
from assocmem.sweep import LocalBackend, expand_grid, make_jobs, run_configs

LCA = get_task("lca")
SMALL = {"task.m": 3, "task.L": 8, "model.d_model": 8, "optim.steps": 5, "optim.batch_size": 16,
         "eval.n_eval": 64}


def grid(seeds, extra=None):
    return {"task": "lca", "base": SMALL, "grid": {"seed": list(seeds), **(extra or {})}}


def test_expand_grid_cross_product_and_union():
    task, cfgs = expand_grid(grid(range(3), {"task.L": [8, 16]}))
    assert len(cfgs) == 6 and {c.task.L for c in cfgs} == {8, 16}
    _, cfgs = expand_grid({"task": "lca", "base": SMALL, "grid": [{"seed": [0, 1]}, {"seed": [1, 2]}]})
    assert [c.seed for c in cfgs] == [0, 1, 2]          # union, duplicates removed
    jobs = make_jobs(task, expand_grid(grid(range(3), {"task.L": [8, 16]}))[1])
    assert sorted(len(j.configs) for j in jobs) == [3, 3]   # stacked by shape


def test_store_write_read_table_and_skip(tmp_path):
    store = RunStore(tmp_path)
    task, cfgs = expand_grid(grid(range(3)))
    rep = run_configs(task, cfgs, store, progress=False)
    assert rep.ran == 3 and rep.failed == 0
    rid = run_id(LCA, cfgs[1])
    rec = store.load(rid)
    assert rec["status"] == "ok" and rec["config"]["seed"] == 1 and 0 <= rec["metrics"]["accuracy"] <= 1
    assert set(store.load_weights(rid)) == {"W_E", "W_Q", "W_K", "W_V"}
    df = pd.read_parquet(tmp_path / "runs.parquet")
    assert len(df) == 3 and {"task.m", "model.d_model", "optim.lr", "accuracy", "status"} <= set(df.columns)
    rep2 = run_configs(task, cfgs, store, progress=False)
    assert rep2.ran == 0 and rep2.skipped == 3
    before = store.load(rid)["metrics"]
    rep3 = run_configs(task, cfgs[:1], store, progress=False, force=True)
    assert rep3.ran == 1
    assert store.load(run_id(LCA, cfgs[0]))["metrics"]["accuracy"] == \
        RunStore(tmp_path).load(run_id(LCA, cfgs[0]))["metrics"]["accuracy"]
    assert store.load(rid)["metrics"] == before


def test_failed_and_diverged_runs_are_recorded_and_others_continue(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    task, cfgs = expand_grid(grid(range(2), {"optim.lr": [0.01, 5.0]}))
    real = lca_runner.run_stack

    def flaky(configs):
        if configs[0].optim.lr == 5.0:
            raise RuntimeError("boom")
        return real(configs)
    monkeypatch.setattr(lca_runner, "SPEC", dataclasses.replace(task, run_stack=flaky))
    rep = run_configs(lca_runner.SPEC, cfgs, store, progress=False)
    statuses = sorted(store.status(run_id(LCA, c)) for c in cfgs)
    assert statuses == ["error", "error", "ok", "ok"] and rep.failed == 2
    assert "boom" in store.load(run_id(LCA, cfgs[-1]))["error"]
    # errors are retried on the next invocation, finished runs are not
    rep = run_configs(task, cfgs, store, progress=False)
    assert rep.ran == 2


def test_diverged_status_for_non_finite_training(tmp_path):
    store = RunStore(tmp_path)
    task, cfgs = expand_grid({"task": "lca", "base": {**SMALL, "optim.steps": 3}, "grid": {"seed": [0]}})
    cfg = cfgs[0]
    res = RunResult({"accuracy": float("nan")}, {"W": torch.tensor([float("nan")])}, "diverged", "nan loss")
    store.write("x" * 16, "lca", cfg, res)
    rec = store.load("x" * 16)
    assert rec["status"] == "diverged" and rec["metrics"]["accuracy"] is None
    assert store.is_finished("x" * 16)


def test_write_is_atomic_and_cleanup_removes_leftovers(tmp_path):
    store = RunStore(tmp_path)
    task, cfgs = expand_grid(grid([0]))
    # a leftover temp folder of a dead process, as after SIGKILL mid-write
    dead = tmp_path / "runs" / ".tmp-999999-abc-xyz"
    dead.mkdir(parents=True)
    (dead / "config.json").write_text("{")
    assert store.run_ids() == []               # never listed as a run
    run_configs(task, cfgs, store, progress=False)
    assert not dead.exists() and len(store.run_ids()) == 1


def test_parallel_local_backend_matches_inline(tmp_path):
    task, cfgs = expand_grid(grid(range(2), {"task.L": [8, 12]}))
    a, b = RunStore(tmp_path / "a"), RunStore(tmp_path / "b")
    run_configs(task, cfgs, a, progress=False)
    run_configs(task, cfgs, b, backend=LocalBackend(2), progress=False)
    for c in cfgs:
        rid = run_id(LCA, c)
        assert a.load(rid)["metrics"]["accuracy"] == b.load(rid)["metrics"]["accuracy"]


@pytest.mark.slow
def test_sigkill_mid_grid_then_rerun_completes_exactly_once(tmp_path):
    spec = tmp_path / "grid.yaml"
    import yaml
    spec.write_text(yaml.safe_dump({"task": "lca", "base": {**SMALL, "optim.steps": 40, "eval.n_eval": 512},
                                    "grid": {"seed": list(range(12)), "task.L": [8, 16]}}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "assocmem.cli", "sweep", str(spec), "--out", str(out), "--no-stack"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs"
    deadline = time.time() + 60
    while time.time() < deadline:           # kill once a few runs are in
        if runs.exists() and len([p for p in runs.iterdir() if not p.name.startswith(".")]) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = RunStore(out)
    n_before = len(store.run_ids())
    assert 0 < n_before < 24
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = store.run_ids()
    assert len(ids) == 24 and len(set(ids)) == 24
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]
    for rid in ids:
        rec = store.load(rid)
        assert rec["status"] == "ok" and rec["run_id"] == rid
        assert run_id(LCA, LCA.make_config(rec["config"])) == rid
        store.load_weights(rid)
    assert len(pd.read_parquet(out / "runs.parquet")) == 24
