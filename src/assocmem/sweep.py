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
running again completes the grid with nothing lost, duplicated or half-written. Worker processes
die with the driver (``kill -9`` included); Ctrl-C stores every run that had come back and raises
:class:`Interrupted`, which says how many; a dead worker's job is retried once, then recorded as
failed. Several sweeps may write one store at once (the store's writes are content-addressed).
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from .config import ConfigError, flatten, load_yaml, merge, unflatten
from .procs import die_with_parent
from .registry import TASKS, RunResult, TaskSpec, config_from, get_task, load_spec, run_id
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
            if not grid[key]:
                raise ConfigError(f"grid.{key}: empty list (allowed: a list of at least one value)")
        for values in itertools.product(*(grid[k] for k in keys)):
            cfg = config_from(task, base, unflatten(dict(zip(keys, values))))
            rid = run_id(task, cfg)
            if rid not in seen:
                seen.add(rid)
                configs.append(cfg)
    if not configs:
        raise ConfigError("grid: no configs (allowed: a mapping of key: [values], or a non-empty list of them)")
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
            jobs.append(Job(task.name, chunk, [run_id(task, c) for c in chunk],
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_configs`, raised after every run that had come back was stored."""

    def __init__(self, stored: int, total: int):
        super().__init__(f"interrupted: stored {stored} of {total} runs; rerun to continue")
        self.stored, self.total = stored, total

    def __str__(self) -> str:
        return str(self.args[0])


_STARTED: Any = None      # in a worker: shared byte per job of the round, set when the job starts


def _init_worker(threads: int, parent: int, started: Any = None) -> None:
    """Worker start: die with the driver (kill -9 included); Ctrl-C is the driver's to handle."""
    global _STARTED
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _STARTED = started
    import torch
    torch.set_num_threads(threads)


def _execute_in_worker(slot: int, job: Job) -> list[RunResult]:
    if _STARTED is not None:
        _STARTED[slot] = 1
    return execute_job(job)


def _failed(job: Job, error: str) -> list[RunResult]:
    return [RunResult(metrics={}, status="error", error=error) for _ in job.configs]


def _stop(pool: cf.ProcessPoolExecutor, *, force: bool) -> None:
    """Shut ``pool`` down; with ``force`` cancel what is queued and end its workers now."""
    if not force:
        pool.shutdown(wait=True)
        return
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


class LocalBackend:
    """In-process (``jobs=1``) or a pool of ``jobs`` worker processes on this machine.

    Workers die with the driver (:mod:`assocmem.procs`) and ignore Ctrl-C, which the driver handles:
    on KeyboardInterrupt the queue is cancelled, the workers are ended, the results that had already
    come back are still yielded, then the interrupt propagates. A worker that dies (e.g. by the OOM
    killer) breaks the pool: the jobs that were running then are suspects and run again one at a time,
    each in a fresh one-worker pool, so a second death names its job, which is yielded as failed
    ("worker died: ..."); jobs that had not started run again as usual, and the sweep goes on."""

    def __init__(self, jobs: int = 1):
        if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
            raise ConfigError(f"--jobs: {jobs!r} is not allowed (allowed: integer >= 1; 1 runs in-process)")
        self.jobs = jobs

    def map(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, list[RunResult]]]:
        if self.jobs == 1 or len(jobs) <= 1:
            for job in jobs:
                yield job, execute_job(job)
            return
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        hits = [0] * len(jobs)                  # times each job was running when its worker died
        pending = list(range(len(jobs)))
        stalled = 0
        while pending:
            rounds = [([i], 1) for i in pending if hits[i]]         # suspects: alone, one at a time
            rest = [i for i in pending if not hits[i]]
            if rest:
                rounds.append((rest, self.jobs))
            pending = []
            for idx, workers in rounds:
                broken, started = yield from self._round(jobs, idx, workers, threads)
                stalled = stalled + 1 if broken and not started else 0   # workers die before any job
                lost = 0
                for i, why in broken.items():
                    hits[i] += i in started or stalled >= 2
                    if hits[i] < 2 and stalled < 2:
                        pending.append(i)
                    else:
                        lost += 1
                        yield jobs[i], _failed(jobs[i], f"worker died: {why} (job retried once, alone)")
                if broken:
                    print(f"assocmem: a worker process died; {len(broken) - lost} unfinished job(s) run again, "
                          f"{lost} recorded as failed", file=sys.stderr)

    def _round(self, jobs: Sequence[Job], pending: list[int], workers: int, threads: int):
        """Run ``jobs[pending]`` in one fresh pool of ``workers`` processes; yield results; return
        ({index: why} of jobs lost to a dead worker, indices of the jobs that had started)."""
        ctx = mp.get_context("spawn")
        flags = ctx.RawArray("b", len(pending))     # lock-free: a killed worker cannot hold a lock
        pool = cf.ProcessPoolExecutor(min(workers, len(pending)), mp_context=ctx, initializer=_init_worker,
                                      initargs=(threads, os.getpid(), flags))
        futures: dict[cf.Future, int] = {}
        yielded: set[cf.Future] = set()
        broken: dict[int, str] = {}
        clean = False
        try:
            try:
                for slot, i in enumerate(pending):
                    futures[pool.submit(_execute_in_worker, slot, jobs[i])] = i
                for fut in cf.as_completed(futures):
                    i = futures[fut]
                    try:
                        results = fut.result()
                    except BrokenProcessPool as e:
                        broken[i] = (str(e) or type(e).__name__).splitlines()[0]
                        continue
                    except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be pickled
                        results = _failed(jobs[i], f"{type(e).__name__}: {e}")
                    yielded.add(fut)
                    yield jobs[i], results
                clean = not broken
            except KeyboardInterrupt:
                _stop(pool, force=True)
                for fut, i in futures.items():     # results that came back before the interrupt
                    if fut not in yielded and fut.done() and not fut.cancelled() and fut.exception() is None:
                        yielded.add(fut)
                        yield jobs[i], fut.result()
                raise
        finally:
            _stop(pool, force=not clean)
        return broken, {i for slot, i in enumerate(pending) if flags[slot]}


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


@dataclasses.dataclass
class SweepReport:
    run_ids: list[str]
    ran: int             # runs this invocation set out to compute
    skipped: int         # already finished before it started
    failed: int          # stored with a status other than ok
    wall_s: float
    stored: int = 0      # runs this invocation wrote (ran less those another process finished meanwhile)


def _check_devices(configs: Sequence[Any]) -> None:
    """Raise ConfigError before any training if a config asks for a device this machine lacks."""
    from .training import resolve_device
    for dev in sorted({d for c in configs if isinstance(d := getattr(c, "device", None), str)}):
        resolve_device(dev)


def _sync(store: RunStore) -> None:
    try:
        store.sync_table()
    except OSError:      # a full disk must not hide what was stored; the next run rebuilds it
        pass


def run_configs(task: TaskSpec, configs: Sequence[Any], store: RunStore, *, backend: Backend | None = None,
                force: bool = False, stack: bool = True, progress: bool = True,
                desc: str | None = None) -> SweepReport:
    """Run every config not yet finished in ``store`` (all of them with ``force``).

    Before any training: leftovers of dead writers are removed, and if there is work the store must be
    writable and (local backend) every requested device present, else ConfigError. Each run is written
    as soon as its job returns; one finished meanwhile by another process is kept, not overwritten.
    Ctrl-C stores what had come back and raises :class:`Interrupted`. Ends with ``store.sync_table()``.
    """
    t0 = time.perf_counter()
    backend = backend or LocalBackend(1)
    try:
        store.cleanup()
    except OSError:      # read-only store: nothing of ours to clean
        pass
    ids = [run_id(task, c) for c in configs]
    todo = list({rid: c for c, rid in zip(configs, ids) if force or not store.is_finished(rid)}.values())
    if todo:
        if isinstance(backend, LocalBackend):
            _check_devices(todo)
        store.ensure_writable()
    jobs = make_jobs(task, todo, stack=stack)
    failed = stored = 0
    meta = {"python": sys.version.split()[0]}
    try:
        import torch
        meta["torch"] = torch.__version__
    except ImportError:
        pass
    if todo and isinstance(backend, LocalBackend):
        from .blas import route
        meta["blas"] = route()       # the route of single-threaded fp32 products on this machine
    bar = tqdm(total=len(todo), desc=desc or task.name, unit="run", disable=not progress or not todo,
               file=sys.stderr, dynamic_ncols=True)
    results_iter = backend.map(jobs)
    try:
        with bar:
            for job, results in results_iter:
                for cfg, rid, res in zip(job.configs, job.run_ids, results):
                    if not force and store.is_finished(rid):   # another sweep finished it meanwhile
                        bar.update(1)
                        continue
                    store.write(rid, task, cfg, res, meta=meta, replace=True if force else None)
                    stored += 1
                    failed += res.status != "ok"
                    bar.update(1)
    except KeyboardInterrupt:
        close = getattr(results_iter, "close", None)
        if close is not None:
            close()          # a generator interrupted outside itself: its finally ends the workers
        _sync(store)
        raise Interrupted(stored, len(todo)) from None
    _sync(store)
    return SweepReport(ids, len(todo), len(configs) - len(todo), failed, time.perf_counter() - t0, stored)


def run_summary(df: pd.DataFrame, keys: Sequence[str]) -> str:
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
    """Read a grid file; ``overrides`` (nested) replace values of its base. Overriding a key the grid
    varies is refused (ConfigError): the grid would silently lose that axis."""
    spec = load_yaml(path)
    if overrides:
        grids = spec.get("grid") or {}
        varied = [k for g in ([grids] if isinstance(grids, Mapping) else grids) if isinstance(g, Mapping)
                  for k in g]
        for key in flatten(overrides):
            for g in varied:
                if key == g or key.startswith(f"{g}.") or str(g).startswith(f"{key}."):
                    raise ConfigError(f"{key}: the grid varies {g} (grid.{g}); change it in {path}, "
                                      "not on the command line")
        spec["base"] = merge(unflatten(spec.get("base") or {}), overrides)
    return expand_grid(spec)
