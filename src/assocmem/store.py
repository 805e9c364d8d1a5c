"""Run store: every run lives under ``ROOT/runs/<run_id>/`` where run_id is the config's content hash.

Layout of a finished run (written to a temporary folder, then renamed in one step, so a reader never
sees half a run)::

    config.json        {"task": ..., "run_id": ..., "config": {...resolved...}}
    metrics.json       {"status": "ok"|"diverged"|"error", "error": ..., "metrics": {...}, "meta": {...}}
    weights.safetensors

``ROOT/runs.parquet`` is a tidy table, one row per run, with flattened config columns
(``task.m``, ``model.d_model`` ...) and scalar metrics; it is rebuilt from the run folders.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .config import flatten, to_dict
from .registry import RunResult

if TYPE_CHECKING:
    import pandas as pd

FINISHED = ("ok", "diverged")


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):
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


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    def __init__(self, root: str | Path = "runs"):
        self.root = Path(root)
        self.runs = self.root / "runs"

    # ---- reading -------------------------------------------------------------------------
    def path(self, run_id: str) -> Path:
        return self.runs / run_id

    def status(self, run_id: str) -> str | None:
        p = self.path(run_id) / "metrics.json"
        if not p.exists():
            return None
        return json.loads(p.read_text())["status"]

    def is_finished(self, run_id: str) -> bool:
        return self.status(run_id) in FINISHED

    def load(self, run_id: str) -> dict[str, Any]:
        """``{"run_id", "task", "config", "status", "error", "metrics", "meta"}`` of a stored run."""
        p = self.path(run_id)
        cfg = json.loads((p / "config.json").read_text())
        met = json.loads((p / "metrics.json").read_text())
        return {**cfg, **met}

    def load_weights(self, run_id: str) -> dict[str, torch.Tensor]:
        return load_file(self.path(run_id) / "weights.safetensors")

    def run_ids(self) -> list[str]:
        if not self.runs.exists():
            return []
        return sorted(p.name for p in self.runs.iterdir() if not p.name.startswith(".") and p.is_dir())

    # ---- writing -------------------------------------------------------------------------
    def write(self, run_id: str, task: str, config: Any, result: RunResult, meta: dict | None = None) -> Path:
        """Atomically store one run; replaces an earlier run of the same id (``--force``, retries)."""
        self.runs.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.runs, prefix=f".tmp-{os.getpid()}-{run_id}-"))
        try:
            cfg = {"task": task, "run_id": run_id, "config": to_dict(config)}
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            weights = {k: v.detach().to("cpu").contiguous() for k, v in result.weights.items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            met = {"status": result.status, "error": result.error, "metrics": _clean(result.metrics),
                   "meta": {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}}
            (tmp / "metrics.json").write_text(json.dumps(met, indent=2, default=_json_default))
            final = self.path(run_id)
            if final.exists():  # replace: move the old one aside first, then swap in the new one
                old = self.runs / f".old-{os.getpid()}-{run_id}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def cleanup(self) -> int:
        """Remove temporary folders left by killed processes (only those whose process is gone)."""
        removed = 0
        if not self.runs.exists():
            return 0
        for p in self.runs.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                try:
                    pid = int(p.name.split("-")[1])
                except (IndexError, ValueError):
                    continue
                if not _pid_alive(pid) or pid == os.getpid():
                    if p.name.startswith(".old-") and not self.path(p.name.split("-", 2)[2]).exists():
                        os.rename(p, self.path(p.name.split("-", 2)[2]))  # killed mid-swap: restore
                    else:
                        shutil.rmtree(p, ignore_errors=True)
                    removed += 1
        return removed

    # ---- the table ---------------------------------------------------------------------------
    def table(self, task: str | None = None) -> pd.DataFrame:
        """One row per stored run: run_id, task, status, flattened config and scalar metrics."""
        import pandas as pd        # here, not at module level: sweep workers never need it

        rows = []
        for rid in self.run_ids():
            try:
                rec = self.load(rid)
            except (OSError, json.JSONDecodeError, KeyError):
                continue
            if task is not None and rec["task"] != task:
                continue
            row = {"run_id": rid, "task": rec["task"], "status": rec["status"]}
            row.update(flatten(rec["config"]))
            for k, v in flatten(rec.get("metrics") or {}).items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    row[k] = v
            rows.append(row)
        df = pd.DataFrame(rows)
        for col in df.columns:  # lists (e.g. betas) -> strings, so the column is parquet-friendly
            if df[col].map(lambda v: isinstance(v, list)).any():
                df[col] = df[col].map(json.dumps)
        return df

    def write_table(self) -> Path:
        df = self.table()
        out = self.root / "runs.parquet"
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".runs.", suffix=".parquet")
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out
