"""Command-line interface: a thin layer over the library.

    assocmem run TASK [key=value ...] [--config FILE] [--out DIR] [--json] [--force]
    assocmem sweep GRID.yaml [key=value ...] [--out DIR] [--jobs N] [--backend local] [--force]
    assocmem runs [--out DIR] [--task TASK] [--check]
    assocmem reproduce {elephants,hijack,geometric,induction,all} [--scale quick|paper] [--out DIR] [--jobs N]
              [--models M1,M2 --device D --dtype T --n N ...]   (hijack options; see ``--help``)
    assocmem hijack {score,demo} ...

Invalid input exits with status 2 and one line naming the key and the allowed values. ``--jobs N``
means the same everywhere: N worker processes, 1 = in-process (``reproduce`` without ``--jobs`` lets
each experiment choose; elephants uses one process per core, induction trains its README-config run
in-process and the others in one process per core). Ctrl-C stores every finished run, says
how many, and exits 130.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, load_yaml, parse_dotlist, to_dict, unflatten

DEFAULT_OUT = "assocmem-out"

# paper key -> "module:function";
# function(out_dir: Path, scale: str, force: bool[, jobs: int | None][, backend=None]) -> findings.Section;
# the caller writes the report (report.write_report)
REPRODUCTIONS: dict[str, str] = {
    "elephants": "assocmem.experiments.lca:reproduce",
    "induction": "assocmem.experiments.induction:reproduce",
    "geometric": "assocmem.experiments.geometric:reproduce",
    "hijack": "assocmem.experiments.hijack:reproduce",
}
# optional sub-command groups: module exposing add_parser(subparsers)
EXTENSIONS: dict[str, str] = {"hijack": "assocmem.hijack.cli"}


def _out(value: str) -> str:
    """``--out``: a folder that exists or can be created (checked before any training)."""
    if not value.strip():
        raise ConfigError("--out: '' is empty (allowed: a folder path)")
    path = Path(value)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"--out: {p} is a file (allowed: a folder)")
            break
    return value


def _jobs(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ConfigError(f"--jobs: {value} is not allowed (allowed: integer >= 1; 1 runs in-process)")
    return value


@contextlib.contextmanager
def _step_progress(enabled: bool):
    """A progress bar on stderr (step, loss, ETA) for the training loops run inside the block."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    from .training import on_step
    bar = None

    def show(step: int, total: int, values: dict) -> None:
        nonlocal bar
        if bar is None or step < bar.n:            # first loop, or the next stack of a multi-stack run
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
        if bar.update(step - bar.n) and values.get("loss") is not None:
            bar.set_postfix(loss=f"{float(values['loss'].detach().float().nanmean()):.4g}")

    try:
        with on_step(show):
            yield
    finally:
        if bar is not None:
            bar.close()


def _cmd_run(args: argparse.Namespace) -> int:
    from .registry import config_from, get_task, run_id
    from .store import RunStore
    from .sweep import run_configs

    task = get_task(args.task)
    overrides = parse_dotlist(args.overrides)
    cfg = config_from(task, unflatten(load_yaml(args.config)) if args.config else {}, overrides)
    store = RunStore(_out(args.out))
    rid = run_id(task, cfg)
    t0 = time.perf_counter()
    with _step_progress(sys.stderr.isatty()):
        rep = run_configs(task, [cfg], store, force=args.force, progress=False)
    rec = store.load(rid)
    metrics = rec.get("metrics") or {}
    out = {"run_id": rid, "task": task.name, "status": rec["status"], "skipped": rep.skipped == 1,
           "accuracy": metrics.get("accuracy"), "wall_s": round(time.perf_counter() - t0, 4),
           "train_wall_s": metrics.get("wall_s"), "path": str(store.path(rid))}
    if not args.json:
        print(json.dumps(to_dict(cfg), indent=1))
        verb = "skipped (already finished)" if out["skipped"] else "finished"
        print(f"run {rid} {verb}: status={rec['status']} accuracy={out['accuracy']} -> {out['path']}")
        if rec.get("error"):
            print(rec["error"].splitlines()[0], file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0 if rec["status"] == "ok" else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .store import RunStore
    from .sweep import grid_from_file, make_backend, run_configs, run_summary

    _jobs(args.jobs)
    task, configs = grid_from_file(args.grid, parse_dotlist(args.overrides))
    store = RunStore(_out(args.out))
    kwargs = {"jobs": args.jobs} if args.backend == "local" else {"address": args.address}
    backend = make_backend(args.backend, **kwargs)
    rep = run_configs(task, configs, store, backend=backend, force=args.force, stack=not args.no_stack)
    df = store.table()                                      # the run folders, not a possibly stale table
    print(run_summary(df[df["run_id"].isin(rep.run_ids)] if not df.empty else df, task.summary_keys))
    print(f"{len(rep.run_ids)} runs: {rep.ran} ran, {rep.skipped} already finished, {rep.failed} failed "
          f"({rep.wall_s:.1f} s); table: {store.root / 'runs.parquet'}")
    return 0 if rep.failed == 0 else 1


def _cmd_runs(args: argparse.Namespace) -> int:
    from .registry import TASKS, get_task
    from .store import RunStore
    from .sweep import run_summary

    store = RunStore(_out(args.out))
    if args.check:
        problems = store.check()
        for rid, why in problems:
            print(f"{rid}: {why}")
        print(f"{len(problems)} damaged run(s) in {store.root}" if problems else f"no damaged runs in {store.root}")
        return 1 if problems else 0
    df = store.table(args.task)
    if df.empty:
        print(f"no runs in {store.root}")
        return 0
    keys: list[str] = ["task"] + (["protocol"] if "protocol" in df.columns else [])
    for name in sorted(set(df["task"])):
        if name in TASKS:
            keys += [k for k in get_task(name).summary_keys if k not in keys]
    print(run_summary(df, keys))
    print(f"{len(df)} runs in {store.root}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .report import write_index, write_report

    from .sweep import make_backend

    _jobs(args.jobs)
    backend = None if args.backend == "local" else \
        make_backend(args.backend, jobs=args.jobs, address=args.address)
    names = list(REPRODUCTIONS) if args.paper == "all" else [args.paper]
    from .hijack.cli import reproduce_kwargs
    hijack_kwargs = reproduce_kwargs(args) if "hijack" in names else {}
    out = Path(_out(args.out))
    entries = []
    for name in names:
        module, fn = REPRODUCTIONS[name].split(":")
        reproduce = getattr(importlib.import_module(module), fn)
        sub = out / name if args.paper == "all" else out
        t0 = time.perf_counter()
        params = inspect.signature(reproduce).parameters
        extra = dict(hijack_kwargs) if name == "hijack" else {}
        if backend is not None and "backend" in params:     # hijack trains nothing: no backend
            extra["backend"] = backend
        if "jobs" in params:
            extra["jobs"] = args.jobs
        section = reproduce(out_dir=sub, scale=args.scale, force=args.force, **extra)
        write_report(section, sub)
        print(f"{name}: {section.tally()} in {time.perf_counter() - t0:.1f} s -> {sub / 'report.html'}")
        entries.append((section, f"{name}/report.html" if args.paper == "all" else "report.html"))
    if args.paper == "all":
        print(f"index: {write_index(entries, out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="assocmem", description="Associative memory in transformers: "
                                "train, sweep, reproduce papers, and score context hijacking.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"assocmem {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train and evaluate one run")
    r.add_argument("task", help="task family, e.g. lca")
    r.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. task.m=6 optim.lr=0.01")
    r.add_argument("--config", help="YAML file with config values (overrides win)")
    r.add_argument("--out", default=DEFAULT_OUT, help=f"store folder (default {DEFAULT_OUT})")
    r.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    r.add_argument("--force", action="store_true", help="redo even if finished")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("sweep", help="run a grid of configs from a YAML file")
    s.add_argument("grid")
    s.add_argument("overrides", nargs="*", help="key=value overrides applied to the grid's base")
    s.add_argument("--out", default=DEFAULT_OUT)
    s.add_argument("--jobs", type=int, default=1, help="worker processes (default 1: in-process)")
    s.add_argument("--backend", default="local", help="execution backend: local (default) or ray")
    s.add_argument("--address", help="ray: cluster address (default: RAY_ADDRESS or a local instance)")
    s.add_argument("--force", action="store_true")
    s.add_argument("--no-stack", action="store_true", help="do not batch seeds into one model")
    s.set_defaults(fn=_cmd_sweep)

    ls = sub.add_parser("runs", help="list stored runs")
    ls.add_argument("--out", default=DEFAULT_OUT)
    ls.add_argument("--task")
    ls.add_argument("--check", action="store_true", help="verify every run's files; list damaged runs (exit 1 if any)")
    ls.set_defaults(fn=_cmd_runs)

    rp = sub.add_parser("reproduce", help="reproduce a paper's figures and write its report")
    rp.add_argument("paper", choices=[*REPRODUCTIONS, "all"])
    rp.add_argument("--scale", choices=["quick", "paper"], default="quick")
    rp.add_argument("--out", default="reproduction")
    rp.add_argument("--jobs", type=int, default=None,
                    help="worker processes, 1 = in-process (default: the experiment's choice; elephants: one per core)")
    rp.add_argument("--force", action="store_true", help="retrain even finished runs")
    from .hijack.cli import reproduce_options
    reproduce_options(rp)
    rp.add_argument("--backend", default="local", help="execution backend for training runs: local or ray")
    rp.add_argument("--address", help="ray: cluster address (default: RAY_ADDRESS or a local instance)")
    rp.set_defaults(fn=_cmd_reproduce)

    for module in EXTENSIONS.values():
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.fn(args)
        sys.stdout.flush()               # a closed pipe shows here, not as a traceback at exit
        return rc
    except ConfigError as e:
        print(f"assocmem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:       # sweep.Interrupted says how many runs it stored
        print(f"assocmem: {e}" if str(e) else "assocmem: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:              # e.g. `assocmem runs | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
