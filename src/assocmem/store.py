"""Run store: every run lives under ``ROOT/runs/<run_id>/``; run_id = :func:`registry.run_id`, the content
hash of the task name, the task's code protocol and the resolved config.

Layout of a stored run (built in a temporary folder, then renamed into place in one step, so a reader
never sees half a run)::

    config.json          {"task", "run_id", "protocol", "config": {...resolved...}}
    weights.safetensors
    metrics.json         {"status": "ok"|"diverged"|"error", "error", "metrics": {...}, "meta": {..., "protocol"}}
    done.json            completion record, written last: {"status", "protocol", "files": {name: {"size", "sha256"}}}

A run is *finished* when its status is ok or diverged and every file listed in ``done.json`` has its
recorded size (:meth:`RunStore.is_finished`, cheap); :meth:`RunStore.check` also verifies checksums and
that the files parse. A damaged run (truncated, missing file, no completion record) is not finished, so
the next sweep recomputes and replaces it.

``ROOT/runs.parquet`` is a tidy table, one row per run, with flattened config columns (``task.m``,
``model.d_model`` ...) and scalar metrics; :meth:`RunStore.sync_table` rebuilds it from the run folders
whenever it lags them, and never writes when nothing changed or the store is read-only.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import io
from .config import ConfigError, flatten, to_dict
from .registry import TASKS, RunResult, TaskSpec, get_task

if TYPE_CHECKING:
    import pandas as pd

FINISHED = ("ok", "diverged")
DONE = "done.json"
FILES = ("config.json", "weights.safetensors", "metrics.json")
# Metrics of a diverged run that stay as they were: bookkeeping, not measurements.
KEPT_WHEN_DIVERGED = frozenset({"wall_s", "stack_size"})
# A ``.tmp-*`` / ``.old-*`` entry this old is a leftover even if its pid now names a live process
# (pid reuse): building a run folder takes seconds, training happens before it.
STALE_S = 3600.0
_STARTED = time.time()
TABLE_KEYS = ("run_id", "task", "protocol", "status", "record")


def _json_default(x: Any) -> Any:
    if hasattr(x, "tolist"):          # torch tensors, numpy arrays and scalars
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def _clean(x: Any) -> Any:
    """Replace non-finite floats by None so metrics stay valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def missing_when_diverged(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics of a diverged run: every measured scalar (a float: accuracy, losses, margins, success
    rates) becomes None, at any depth of nested dicts; keys are kept. Counts and settings (ints, bools,
    strings), lists (curves: how it diverged) and ``KEPT_WHEN_DIVERGED`` stay as they were."""
    def walk(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = walk(v)
            elif isinstance(v, float) and k not in KEPT_WHEN_DIVERGED:
                out[k] = None
            else:
                out[k] = v
        return out
    return walk(metrics)


def _protocol_of(task: str | TaskSpec, meta: dict | None) -> str | None:
    if isinstance(task, TaskSpec):
        return task.protocol
    if meta and "protocol" in meta:
        return meta["protocol"]
    return get_task(task).protocol if task in TASKS else None


def _read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing, unreadable or not valid JSON (a damaged run)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunStore:
    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.table_path = self.root / "runs.parquet"

    # ---- reading -------------------------------------------------------------------------
    def path(self, run_id: str) -> Path:
        return self.runs / run_id

    def record(self, run_id: str) -> dict | None:
        """The run's completion record (``done.json``), or None if it has none or it is unreadable."""
        rec = _read_json(self.path(run_id) / DONE)
        return rec if isinstance(rec, dict) and isinstance(rec.get("files"), dict) else None

    def _intact(self, run_id: str, rec: dict | None) -> bool:
        if rec is None:
            return False
        p = self.path(run_id)
        try:
            return all(isinstance(f, dict) and (p / name).stat().st_size == f.get("size")
                       for name, f in rec["files"].items())
        except OSError:
            return False

    def status(self, run_id: str) -> str | None:
        """``ok`` / ``diverged`` / ``error`` of an intact run; None if absent or damaged."""
        rec = self.record(run_id)
        return rec.get("status") if self._intact(run_id, rec) else None

    def is_finished(self, run_id: str) -> bool:
        """Status ok or diverged and every recorded file present with its recorded size."""
        return self.status(run_id) in FINISHED

    def load(self, run_id: str) -> dict[str, Any]:
        """``{"run_id", "task", "protocol", "config", "status", "error", "metrics", "meta"}`` of a run."""
        p = self.path(run_id)
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        met = json.loads((p / "metrics.json").read_text(encoding="utf-8"))
        return {**cfg, **met}

    def load_weights(self, run_id: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(run_id) / "weights.safetensors")

    def run_ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.runs.iterdir() if not p.name.startswith(".") and p.is_dir())
        except OSError:
            return []

    def check(self) -> list[tuple[str, str]]:
        """``(run_id, problem)`` for every damaged run: no or unreadable completion record, a missing
        file, a size or SHA-256 differing from the record, a file that does not parse."""
        problems = []
        for rid in self.run_ids():
            problem = self._problem(rid)
            if problem:
                problems.append((rid, problem))
        return problems

    def _problem(self, rid: str) -> str | None:
        p = self.path(rid)
        if not (p / DONE).exists():
            return f"no completion record ({DONE}): the run was not written completely"
        rec = self.record(rid)
        if rec is None:
            return f"completion record {DONE} is unreadable"
        for name, f in sorted(rec["files"].items()):
            try:
                size = (p / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != f.get("size"):
                return f"{name} has {size} bytes, {f.get('size')} recorded (truncated or changed)"
            if io.sha256_file(p / name) != f.get("sha256"):
                return f"{name} differs from its recorded SHA-256"
        for name in FILES:
            if name not in rec["files"]:
                return f"{name} is not in the completion record"
        for name in ("config.json", "metrics.json"):
            if not isinstance(_read_json(p / name), dict):
                return f"{name} is not valid JSON"
        try:
            with safe_open(p / "weights.safetensors", framework="pt") as f:
                list(f.keys())
        except Exception as e:  # noqa: BLE001 - any parse failure means damaged
            return f"weights.safetensors does not load ({type(e).__name__})"
        cfg = _read_json(p / "config.json")
        if cfg.get("run_id") != rid:
            return f"config.json names run {cfg.get('run_id')!r}"
        return None

    # ---- writing -------------------------------------------------------------------------
    def ensure_writable(self) -> None:
        """Raise ConfigError (one line) unless runs can be written here; call before any training."""
        def fail(why: str):
            raise ConfigError(f"--out: {self.root} is not writable ({why})")
        for p in (self.root, self.runs):
            if p.exists() and not p.is_dir():
                fail(f"{p} is a file, not a folder")
        existing = self.runs if self.runs.exists() else self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            fail(f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            fail(f"no write permission on {existing}")
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            probe = self.runs / f".tmp-{os.getpid()}-probe-{os.urandom(4).hex()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            fail(e.strerror or type(e).__name__)

    def write(self, run_id: str, task: str | TaskSpec, config: Any, result: RunResult,
              meta: dict | None = None, replace: bool | None = None) -> Path:
        """Store one run; returns its folder.

        The folder is built under a temporary name and published by one rename
        (:func:`io.publish_dir`), so concurrent writers of the same id cannot crash or mix files.
        ``replace``: None (default) replaces an existing run only if it is not finished (an error or
        damaged run) -- a finished run written meanwhile by another process is kept, as runs are
        deterministic and content-addressed; True always replaces (``--force``); False never does.
        Metrics of a diverged run are stored as missing (:func:`missing_when_diverged`)."""
        name = task.name if isinstance(task, TaskSpec) else task
        protocol = _protocol_of(task, meta)
        metrics = _clean(result.metrics)
        if result.status == "diverged":
            metrics = missing_when_diverged(metrics)
        final = self.path(run_id)
        with io.building_dir(self.runs, run_id) as tmp:
            cfg = {"task": name, "run_id": run_id, "protocol": protocol, "config": to_dict(config)}
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
            weights = {k: v.detach().to("cpu").contiguous() for k, v in result.weights.items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            met = {"status": result.status, "error": result.error, "metrics": metrics,
                   "meta": {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {}),
                            "protocol": protocol}}
            (tmp / "metrics.json").write_text(json.dumps(met, indent=2, default=_json_default), encoding="utf-8")
            files = {f: {"size": (tmp / f).stat().st_size, "sha256": io.sha256_file(tmp / f)} for f in FILES}
            done = {"status": result.status, "task": name, "protocol": protocol, "files": files}
            (tmp / DONE).write_text(json.dumps(done, indent=1, sort_keys=True), encoding="utf-8")
            for f in (*FILES, DONE):   # safetensors writes 0600: every file gets 0666 less umask
                os.chmod(tmp / f, io.file_mode())
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            if replace is None:
                replace = final.exists() and not self.is_finished(run_id)
            io.publish_dir(tmp, final, replace=replace)
        return final

    def cleanup(self) -> int:
        """Remove leftovers of dead writers: ``.tmp-<pid>-*`` / ``.old-<pid>-*`` folders under runs/
        whose process is gone (or that are older than STALE_S; this process's own only if made before it
        started), and temporary ``.runs.parquet.*`` files older than STALE_S. Never raises for races
        with other cleaners (an entry vanishing under us) or unreadable entries."""
        removed = 0
        now = time.time()
        for folder, leftover in ((self.runs, io.leftover_pid), (self.root, _table_tmp)):
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for p in entries:
                try:
                    pid = leftover(p.name)
                    if pid is None:
                        continue
                    age = now - p.lstat().st_mtime
                    if pid < 0:        # no pid in the name: only age tells
                        dead = False
                    elif pid == os.getpid():
                        dead = p.lstat().st_mtime < _STARTED
                    else:
                        dead = not io.pid_alive(pid)
                    if not (dead or age > STALE_S):
                        continue
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    removed += 1
                except OSError:    # vanished under us (another cleaner), or not ours to remove
                    continue
        return removed

    # ---- the table ---------------------------------------------------------------------------
    def table(self, task: str | None = None) -> pd.DataFrame:
        """One row per run folder (read from the folders, never from runs.parquet): run_id, task,
        protocol, status, record (a digest of the completion record), flattened config and scalar
        metrics. A damaged run has status ``damaged`` and no metrics (details: :meth:`check`); one whose
        config.json is unreadable has task ``unknown`` (so it is listed, but never under a task)."""
        import pandas as pd        # here, not at module level: sweep workers never need it

        rows = [r for rid in self.run_ids() if (r := self._row(rid, task)) is not None]
        df = pd.DataFrame(rows, columns=None if rows else list(TABLE_KEYS))
        for col in df.columns:  # lists (e.g. betas) -> strings, so the column is parquet-friendly
            if df[col].map(lambda v: isinstance(v, (list, dict))).any():
                df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
        return df

    def _row(self, rid: str, task: str | None) -> dict | None:
        p = self.path(rid)
        rec = self.record(rid)
        cfg = _read_json(p / "config.json")
        cfg = cfg if isinstance(cfg, dict) else {}
        name = cfg.get("task") or "unknown"      # config.json unreadable: listed, never under a task
        if task is not None and name != task:
            return None
        met = _read_json(p / "metrics.json") if self._intact(rid, rec) else None
        status = met.get("status") if isinstance(met, dict) else "damaged"
        row = {"run_id": rid, "task": name, "protocol": cfg.get("protocol", (rec or {}).get("protocol")),
               "status": status, "record": io.content_hash(rec["files"]) if rec else None}
        if isinstance(cfg.get("config"), dict):
            row.update(flatten(cfg["config"]))
        if isinstance(met, dict) and isinstance(met.get("metrics"), dict):
            for k, v in flatten(met["metrics"]).items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    row[k] = v
        return row

    def _records(self) -> set[tuple[str, str | None]]:
        """``(run_id, completion-record digest)`` of every run folder (cheap: done.json only)."""
        out = set()
        for rid in self.run_ids():
            rec = self.record(rid)
            out.add((rid, io.content_hash(rec["files"]) if rec else None))
        return out

    def table_is_current(self) -> bool:
        """runs.parquet has exactly one row per run folder, each with its current completion record."""
        import pandas as pd
        try:
            df = pd.read_parquet(self.table_path, columns=["run_id", "record"])
        except Exception:  # noqa: BLE001 - missing, truncated or an older layout: not current
            return False
        rows = {(r, None if c is None or (isinstance(c, float) and math.isnan(c)) else c)
                for r, c in zip(df["run_id"], df["record"])}
        return len(df) == len(rows) and rows == self._records()

    def sync_table(self) -> Path | None:
        """Rebuild runs.parquet if it lags the run folders. Returns its path when it is current, None
        when there are no runs (no empty table is written) or the store is read-only."""
        if self.table_is_current():
            return self.table_path
        if not self.run_ids() and not self.table_path.exists():
            return None
        if not os.access(self.root, os.W_OK | os.X_OK):
            return None
        for _ in range(3):     # a concurrent writer may publish a run while we build the table
            try:
                io.atomic_write_parquet(self.table(), self.table_path)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return None
                raise
            if self.table_is_current():
                break
        return self.table_path

    write_table = sync_table   # old name


def _table_tmp(name: str) -> int | None:
    """Temporary files of io.atomic_write_parquet(runs.parquet) carry no pid: -1 = age decides."""
    return -1 if name.startswith(".runs.parquet.") and name.endswith(".tmp") else None
