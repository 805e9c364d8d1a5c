"""Run store (issue 18): completion records, damaged runs, concurrent writers, leftovers, the table,
read-only stores, diverged metrics and file modes."""
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from assocmem import findings, io, plots, report
from assocmem.config import ConfigError
from assocmem.registry import RunResult, get_task, run_id
from assocmem.store import DONE, RunStore, missing_when_diverged
from assocmem.sweep import run_configs

LCA = get_task("lca")
TINY = {"task": {"m": 3, "L": 8}, "model": {"d_model": 8}, "optim": {"steps": 5, "batch_size": 16},
        "eval": {"n_eval": 64}}


def cfgs(n=2):
    return [LCA.make_config({**TINY, "seed": s}) for s in range(n)]


def result(acc=0.5, status="ok", scale=1.0):
    return RunResult({"accuracy": acc, "eval_loss": 1.25, "n_eval": 64, "curve": [0.1, 0.2]},
                     {"W": torch.arange(6.0).reshape(2, 3) * scale}, status)


def write(store, cfg, **kw):
    rid = run_id(LCA, cfg)
    store.write(rid, LCA, cfg, result(**kw))
    return rid


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


# ---- completion record and damaged runs ------------------------------------------------------------
def test_completion_record_lists_every_file_and_protocol_is_recorded(tmp_path):
    store = RunStore(tmp_path)
    rid = write(store, cfgs(1)[0])
    done = json.loads((store.path(rid) / DONE).read_text())
    assert set(done["files"]) == {"config.json", "metrics.json", "weights.safetensors"}
    for name, f in done["files"].items():
        assert f["size"] == (store.path(rid) / name).stat().st_size
        assert f["sha256"] == io.sha256_file(store.path(rid) / name)
    rec = store.load(rid)
    assert rec["protocol"] == rec["meta"]["protocol"] == LCA.protocol == done["protocol"]
    assert store.is_finished(rid) and store.check() == []
    df = store.table()
    assert list(df["protocol"]) == [LCA.protocol] and list(df["status"]) == ["ok"]


@pytest.mark.parametrize("damage", ["truncate metrics", "truncate config", "truncate weights", "remove weights", "remove record",
                                    "garble record", "flip a byte"])
def test_damaged_run_is_found_by_check_and_recomputed_by_the_next_sweep(tmp_path, damage):
    store = RunStore(tmp_path)
    cs = cfgs(2)
    assert run_configs(LCA, cs, store, progress=False).ran == 2
    rid = run_id(LCA, cs[0])
    p = store.path(rid)
    if damage == "truncate metrics":
        (p / "metrics.json").write_text((p / "metrics.json").read_text()[:20])
    elif damage == "truncate config":
        (p / "config.json").write_text("{")
        assert rid not in set(store.table("lca")["run_id"])
        assert store.table().set_index("run_id").loc[rid, "task"] == "unknown"
    elif damage == "truncate weights":
        data = (p / "weights.safetensors").read_bytes()
        (p / "weights.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "remove weights":
        (p / "weights.safetensors").unlink()
    elif damage == "remove record":
        (p / DONE).unlink()
    elif damage == "garble record":
        (p / DONE).write_text("{\"files\": ")
    else:              # same size, other content: only the checksum sees it
        data = bytearray((p / "weights.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (p / "weights.safetensors").write_bytes(bytes(data))
    problems = store.check()
    assert [r for r, _ in problems] == [rid], problems
    if damage != "flip a byte":                   # is_finished is cheap: sizes only
        assert not store.is_finished(rid) and store.status(rid) is None
        df = store.table()                        # never crashes; shows the run as damaged
        assert len(df) == 2 and df.set_index("run_id").loc[rid, "status"] == "damaged"
        rep = run_configs(LCA, cs, store, progress=False)
        assert rep.ran == 1 and rep.skipped == 1
        assert store.check() == [] and store.is_finished(rid)
        assert len(pd.read_parquet(tmp_path / "runs.parquet")) == 2
        assert [x.name for x in store.runs.iterdir() if x.name.startswith(".")] == []


# ---- writers -------------------------------------------------------------------------------------
def test_write_keeps_a_finished_run_replaces_error_runs_and_force_replaces(tmp_path):
    store = RunStore(tmp_path)
    c = cfgs(1)[0]
    rid = write(store, c, status="error", acc=0.1)
    assert store.status(rid) == "error" and not store.is_finished(rid)
    write(store, c, acc=0.7)                                  # an error run is replaced
    assert store.load(rid)["metrics"]["accuracy"] == 0.7
    write(store, c, acc=0.9)                                  # a finished run is kept (deterministic)
    assert store.load(rid)["metrics"]["accuracy"] == 0.7
    store.write(rid, LCA, c, result(acc=0.9), replace=True)   # --force
    assert store.load(rid)["metrics"]["accuracy"] == 0.9 and store.check() == []
    assert [x.name for x in store.runs.iterdir()] == [rid]


def _writer(root, n, barrier):
    store = RunStore(root)
    barrier.wait()
    for i in range(n):
        for c in cfgs(3):
            store.write(run_id(LCA, c), LCA, c, result(), replace=(i % 2 == 1))


def test_concurrent_writers_of_the_same_ids_never_crash_or_leave_leftovers(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_writer, args=(tmp_path, 6, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    store = RunStore(tmp_path)
    ids = sorted(run_id(LCA, c) for c in cfgs(3))
    assert sorted(x.name for x in store.runs.iterdir()) == ids      # each run once, no .tmp/.old left
    assert store.check() == [] and all(store.is_finished(r) for r in ids)


def test_concurrent_threads_writing_and_cleaning(tmp_path):
    store = RunStore(tmp_path)
    errors = []

    def work(k):
        try:
            for _ in range(5):
                for c in cfgs(2):
                    store.write(run_id(LCA, c), LCA, c, result(), replace=bool(k % 2))
                store.cleanup()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.check() == [] and len(store.run_ids()) == 2


def test_cleanup_removes_only_dead_writers_leftovers_and_survives_races(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    store.runs.mkdir(parents=True)
    dead_tmp = store.runs / ".tmp-999999999-abc-xyz"
    dead_old = store.runs / ".old-999999999-abc-123"
    live = store.runs / f".tmp-{os.getppid()}-abc-live"          # the parent process is alive
    mine = store.runs / f".tmp-{os.getpid()}-abc-now"            # this process, made after it started
    for p in (dead_tmp, dead_old, live, mine):
        p.mkdir()
        (p / "config.json").write_text("{")
    stale_parquet = tmp_path / ".runs.parquet.x1.tmp"
    fresh_parquet = tmp_path / ".runs.parquet.x2.tmp"
    stale_parquet.write_bytes(b"")
    fresh_parquet.write_bytes(b"")
    os.utime(stale_parquet, (time.time() - 7200,) * 2)
    assert store.run_ids() == []
    assert store.cleanup() == 3
    assert live.exists() and mine.exists() and fresh_parquet.exists()
    assert not dead_tmp.exists() and not dead_old.exists() and not stale_parquet.exists()
    os.utime(live, (time.time() - 7200,) * 2)                    # hours old: pid was reused
    assert store.cleanup() == 1 and not live.exists()
    # another cleaner removes the entry first: no crash
    (store.runs / ".tmp-999999999-b-c").mkdir()

    def gone(path, *a, **k):
        raise FileNotFoundError(path)
    monkeypatch.setattr(shutil, "rmtree", gone)
    assert store.cleanup() == 0


# ---- the table and read-only stores ----------------------------------------------------------------
def test_sync_table_rebuilds_only_when_it_lags(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    assert store.sync_table() is None and not store.table_path.exists()     # no runs: no empty table
    cs = cfgs(3)
    write(store, cs[0])
    write(store, cs[1])
    assert store.sync_table() == store.table_path
    assert len(pd.read_parquet(store.table_path)) == 2

    def forbidden(*a, **k):
        raise AssertionError("rewrote a current table")
    real = io.atomic_write_parquet
    monkeypatch.setattr(io, "atomic_write_parquet", forbidden)
    assert store.sync_table() == store.table_path                           # current: nothing written
    write(store, cs[2])                                                     # a run the table lacks
    with pytest.raises(AssertionError):
        store.sync_table()
    monkeypatch.setattr(io, "atomic_write_parquet", real)
    assert store.sync_table() and len(pd.read_parquet(store.table_path)) == 3
    (store.path(run_id(LCA, cs[2])) / DONE).unlink()                        # damaged since: lags again
    assert not store.table_is_current()
    store.sync_table()
    df = pd.read_parquet(store.table_path)
    assert len(df) == 3 and sorted(df["status"]) == ["damaged", "ok", "ok"]


def test_read_only_store_serves_finished_runs(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    write(store, cfgs(1)[0])
    write(store, cfgs(2)[1])

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(io, "atomic_write_parquet", denied)
    assert store.sync_table() is None                         # lagging but not writable: no failure
    rep = run_configs(LCA, cfgs(2), store, progress=False)    # all finished: nothing written
    assert rep.ran == 0 and rep.skipped == 2


def test_ensure_writable_names_the_problem_in_one_line(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"^--out: .*a-file is not writable \(.*file, not a folder\)$"):
        RunStore(f).ensure_writable()
    with pytest.raises(ConfigError, match="not writable"):
        RunStore(f / "below").ensure_writable()
    ok = RunStore(tmp_path / "new" / "store")
    ok.ensure_writable()
    assert ok.runs.is_dir() and list(ok.runs.iterdir()) == []


def test_out_naming_a_file_fails_before_training(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    calls = []
    spec = dataclasses.replace(LCA, run_stack=lambda cs: calls.append(cs) or [result() for _ in cs])
    with pytest.raises(ConfigError, match="--out"):
        run_configs(spec, cfgs(1), RunStore(f), progress=False)
    assert calls == []                                        # refused before any training


def _read_only_checks(root) -> str:
    """What a reader sees in a 0555 store: '' if all is as it should be, else the first problem."""
    store = RunStore(root)
    rid = run_id(LCA, cfgs(1)[0])
    if not store.is_finished(rid) or store.load(rid)["status"] != "ok":
        return "finished run not served"
    if store.sync_table() is not None:
        return "sync_table wrote or claimed a table"
    try:
        store.ensure_writable()
    except ConfigError as e:
        return "" if str(e).startswith(f"--out: {root} is not writable (") else f"message: {e}"
    return "ensure_writable did not raise"


def test_read_only_folder(tmp_path):
    """A 0555 store serves its runs and refuses writes up front. Root ignores permissions, so as root
    the checks run in a forked child that drops to the unprivileged user nobody."""
    base = Path(tempfile.mkdtemp(prefix="assocmem-ro-"))      # /tmp: traversable by nobody
    try:
        os.chmod(base, 0o755)
        store = RunStore(base / "ro")
        write(store, cfgs(1)[0])
        for p in [*store.path(run_id(LCA, cfgs(1)[0])).iterdir(), store.path(run_id(LCA, cfgs(1)[0]))]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(store.runs, 0o555)
        os.chmod(store.root, 0o555)
        if os.geteuid() != 0:
            assert _read_only_checks(store.root) == ""
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                          # child: never returns into pytest
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                msg = _read_only_checks(store.root)
            except BaseException as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {e}"
            os.write(w, (msg or "ok").encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            assert f.read() == "ok"
    finally:
        for p in (base / "ro", base / "ro" / "runs"):
            if p.exists():
                os.chmod(p, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# ---- diverged runs ------------------------------------------------------------------------------------
def test_diverged_metrics_are_stored_as_missing_and_reports_count_them(tmp_path):
    store = RunStore(tmp_path)
    c0, c1, c2 = cfgs(3)
    write(store, c0, acc=0.9)
    write(store, c1, acc=0.7)
    rid = write(store, c2, acc=0.018, status="diverged")
    m = store.load(rid)["metrics"]
    assert m["accuracy"] is None and m["eval_loss"] is None          # measured: missing
    assert m["n_eval"] == 64 and m["curve"] == [0.1, 0.2]            # counts and curves kept
    assert store.is_finished(rid)                                    # deterministic: not retried
    df = store.table()
    assert df["accuracy"].mean() == pytest.approx(0.8)               # the 0.018 never enters a mean
    ok, note = findings.usable_runs(df)
    assert len(ok) == 2 and note == "1 diverged run excluded"
    assert findings.usable_runs(ok)[1] == ""
    assert missing_when_diverged({"a": 1.5, "wall_s": 2.0, "g": {"b": 0.5}, "k": 3}) == \
        {"a": None, "wall_s": 2.0, "g": {"b": None}, "k": 3}


# ---- modes -------------------------------------------------------------------------------------------
def test_files_0644_and_folders_0755_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        store = RunStore(tmp_path / "store")
        rid = write(store, cfgs(1)[0])
        store.sync_table()
        assert mode(store.runs) == mode(store.path(rid)) == 0o755
        for f in store.path(rid).iterdir():
            assert mode(f) == 0o644, f
        assert mode(store.table_path) == 0o644
        fig, ax = plots.new_figure()
        ax.plot([0, 1], [0, 1])
        import assocmem.experiments.geometric_plots  # noqa: F401  (declares geo_e0_margin)
        for p in plots.save(fig, tmp_path / "figs", "geo_e0_margin"):
            assert mode(p) == 0o644
        assert mode(tmp_path / "figs") == 0o755
        md, ht = report.write_report(findings.Section("k", "Title"), tmp_path / "rep")
        assert mode(md) == mode(ht) == 0o644
    finally:
        os.umask(old)
