"""Sweeps: expand a grid into configs, group same-shaped runs into stacked jobs, execute them on a
pluggable backend, and write each finished run to the store from the driver process.

Grid file (YAML)::

    task: lca
    base:                      # nested or dotted keys
      task: {L: 64}
      model.d_model: 64
    grid:                      # cross product; a list of such mappings is a union of products
      task.m: [5, 6, 7, 8]
      seed: [0, 1, 2]

Crash safety: the driver writes a run only once its job has returned, via :meth:`RunStore.write`
(temp folder + rename); a rerun skips finished runs, so killing the process at any moment and
running again completes the grid with nothing lost, duplicated or half-written.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from .config import ConfigError, config_hash, load_yaml, merge, unflatten
from .registry import TASKS, RunResult, TaskSpec, config_from, get_task, load_spec
from .store import RunStore

if TYPE_CHECKING:
    import pandas as pd


@dataclasses.dataclass
class Job:
    """One unit of work for a backend: configs of one task that share a stack key.

    ``spec`` is the task's "module:attribute" path, so a worker process on any machine can import
    it without the driver's registry state."""
    task: str
    configs: list[Any]
    run_ids: list[str]
    spec: str = ""


def expand_grid(spec: Mapping[str, Any]) -> tuple[TaskSpec, list[Any]]:
    """Grid mapping -> (task, validated configs) in a deterministic order, duplicates removed."""
    unknown = set(spec) - {"task", "base", "grid", "name"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown grid key (allowed: task, base, grid, name)")
    if "task" not in spec:
        raise ConfigError("task: the grid file must name a task (e.g. task: lca)")
    task = get_task(spec["task"])
    base = unflatten(spec.get("base") or {})
    grids = spec.get("grid") or {}
    grids = [grids] if isinstance(grids, Mapping) else list(grids)
    configs, seen = [], set()
    for grid in grids:
        keys = list(grid)
        for key in keys:
            if not isinstance(grid[key], (list, tuple)):
                raise ConfigError(f"grid.{key}: expected a list of values, got {grid[key]!r}")
        for values in itertools.product(*(grid[k] for k in keys)):
            cfg = config_from(task, base, unflatten(dict(zip(keys, values))))
            rid = config_hash(task.name, cfg)
            if rid not in seen:
                seen.add(rid)
                configs.append(cfg)
    return task, configs


def make_jobs(task: TaskSpec, configs: Sequence[Any], stack: bool = True) -> list[Job]:
    """Group configs by stack key (first-seen order) into jobs of at most ``task.max_stack``."""
    groups: dict[str, list[Any]] = {}
    for i, cfg in enumerate(configs):
        key = task.stack_key(cfg) if stack else str(i)
        groups.setdefault(key, []).append(cfg)
    jobs = []
    for cfgs in groups.values():
        for i in range(0, len(cfgs), task.max_stack):
            chunk = cfgs[i:i + task.max_stack]
            jobs.append(Job(task.name, chunk, [config_hash(task.name, c) for c in chunk],
                            TASKS.get(task.name, "")))
    return jobs


def execute_job(job: Job) -> list[RunResult]:
    """Run one job; an exception becomes an ``error`` result for each of its runs."""
    task = load_spec(job.spec) if job.spec else get_task(job.task)
    t0 = time.perf_counter()
    try:
        results = task.run_stack(job.configs)
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        msg = f"{type(e).__name__}: {e}"
        tb = traceback.format_exc(limit=5)
        return [RunResult(metrics={}, status="error", error=msg + "\n" + tb) for _ in job.configs]
    wall = time.perf_counter() - t0
    for r in results:
        r.metrics.setdefault("wall_s", wall / len(results))
        r.metrics.setdefault("stack_size", len(results))
    return results


class Backend(Protocol):
    """Executes jobs and yields ``(job, results)`` as they finish; the driver writes the store."""
    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, list[RunResult]]]: ...


def _init_worker(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


class LocalBackend:
    """In-process (jobs=1) or a pool of ``jobs`` worker processes on this machine."""

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ConfigError(f"--jobs: {jobs} is not allowed (allowed: integer >= 1)")
        self.jobs = jobs

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, list[RunResult]]]:
        if self.jobs == 1 or len(jobs) <= 1:
            for job in jobs:
                yield job, execute_job(job)
            return
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_init_worker,
                                    initargs=(threads,)) as pool:
            futures = {pool.submit(execute_job, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                yield futures[fut], fut.result()


# name -> class or "module:Class" (imported on use, so optional dependencies stay optional)
BACKENDS: dict[str, Any] = {"local": LocalBackend, "ray": "assocmem.ray_backend:RayBackend"}


def make_backend(name: str = "local", **kwargs: Any) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"--backend: {name!r} is not allowed (allowed: {', '.join(BACKENDS)})")
    cls = BACKENDS[name]
    if isinstance(cls, str):
        import importlib
        module, attr = cls.split(":")
        cls = getattr(importlib.import_module(module), attr)
    return cls(**kwargs)


_OVERRIDE: Backend | None = None


def override_backend(backend: Backend | None) -> None:
    """Route every later :func:`run_configs` call through ``backend`` (``assocmem reproduce
    --backend ray`` uses this so experiment modules need not know where runs execute)."""
    global _OVERRIDE
    _OVERRIDE = backend


@dataclasses.dataclass
class SweepReport:
    run_ids: list[str]
    ran: int
    skipped: int
    failed: int
    wall_s: float


def run_configs(task: TaskSpec, configs: Sequence[Any], store: RunStore, *, backend: Backend | None = None,
                force: bool = False, stack: bool = True, progress: bool = True,
                desc: str | None = None) -> SweepReport:
    """Run every config not yet finished in ``store`` (all of them with ``force``)."""
    t0 = time.perf_counter()
    backend = _OVERRIDE or backend or LocalBackend(1)
    store.cleanup()
    ids = [config_hash(task.name, c) for c in configs]
    todo = list({rid: c for c, rid in zip(configs, ids) if force or not store.is_finished(rid)}.values())
    jobs = make_jobs(task, todo, stack=stack)
    failed = 0
    bar = tqdm(total=len(todo), desc=desc or task.name, unit="run", disable=not progress or not todo,
               file=sys.stderr, dynamic_ncols=True)
    meta = {"python": sys.version.split()[0]}
    try:
        import torch
        meta["torch"] = torch.__version__
    except ImportError:
        pass
    with bar:
        for job, results in backend.map(jobs):
            for cfg, rid, res in zip(job.configs, job.run_ids, results):
                store.write(rid, task.name, cfg, res, meta=meta)
                failed += res.status != "ok"
            bar.update(len(job.configs))
    store.write_table()
    return SweepReport(ids, len(todo), len(configs) - len(todo), failed, time.perf_counter() - t0)


def summarize(df: pd.DataFrame, keys: Sequence[str]) -> str:
    """Plain-text table of runs (rows of the store's table): id, chosen config keys, accuracy, status."""
    if df.empty:
        return "(no runs)"
    metric = "accuracy" if "accuracy" in df.columns else None
    cols = ["run_id"] + [k for k in keys if k in df.columns] + ([metric] if metric else []) + ["status"]
    out = df[cols].copy()
    if metric:
        out[metric] = out[metric].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}")
    return out.to_string(index=False)


def grid_from_file(path: str, overrides: Mapping[str, Any] | None = None) -> tuple[TaskSpec, list[Any]]:
    spec = load_yaml(path)
    if overrides:
        spec["base"] = merge(unflatten(spec.get("base") or {}), overrides)
    return expand_grid(spec)
