"""Reproduction of the synthetic (LCA) half of "Do LLMs dream of elephants?" (Jiang et al., NeurIPS 2024).

    assocmem reproduce elephants [--scale quick|paper] [--out DIR] [--jobs N]

Trains every run the figure families need (finished runs in ``RunStore(out_dir)`` are reused), runs
the post-hoc analyses on the stored weights, draws every figure into ``out_dir/figures/`` and returns
the report's Section (the caller renders it as ``out_dir/report.{md,html}``). Grids, seed counts and paper targets come from specs/lca.md.

``--jobs N`` is the number of worker processes, each with one torch thread (measured: one thread per
process is several times faster than multi-threaded torch for these small matrices, especially on a
shared machine); ``--jobs 1`` trains in-process. Without ``--jobs``: one process per core.
"""
from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path

import torch

from .. import findings
from ..registry import config_from, get_task, run_id
from ..store import RunStore
from ..sweep import LocalBackend, run_configs
from . import lca_families, lca_references
from .lca_families import Runs
from .scale import REQUIRED, make_scales

SPEC = get_task("lca")
FAMILIES = {**lca_families.FAMILIES, **lca_references.FAMILIES}   # report order
DIMS = (16, 32, 64, 128, 256, 512)


DEFAULTS = {
    "ms": REQUIRED,
    "dims": REQUIRED,
    "seeds": REQUIRED,                    # family -> seed count
    "length_dims": (16, 32, 64),
    "lengths": (8, 16, 32, 64, 128),
    "big_d": 256,                         # d of the standard / cluster families
    "big_L": 256,                         # L of the standard / cluster / dim families
    "n_eval": 4096,
    "n_mix": 1024,
    "n_ref": 4096,                        # sequences per reference-decoder cell
    "steps": 500,
}
SCALES = make_scales(
    DEFAULTS,
    paper={"ms": (5, 6, 7, 8), "dims": DIMS,
           "seeds": {"standard": 5, "dim": 5, "cluster": 10, "length": 5, "low_dim": 10}},
    quick={"ms": (5, 6), "dims": (16, 32, 64, 128), "length_dims": (16, 64), "lengths": (8, 32, 128),
           "seeds": {"standard": 2, "dim": 2, "cluster": 2, "length": 2, "low_dim": 3},
           "big_d": 64, "big_L": 128, "n_eval": 2048, "n_mix": 512},
)


def dim_lr(m: int, d: int) -> float:
    """The dim families' learning-rate rule: 1e-2 if d <= 64 else 1e-3; 1e-2 at d = 128 when m >= 7."""
    return 1e-2 if d <= 64 or (d == 128 and m >= 7) else 1e-3


def _cfg(m: int, d: int, L: int, lr: float, seed: int, *, W_V: str = "trained", emb: str = "trained",
        cluster: int = 0, n_eval: int = 4096, steps: int = 500):
    return config_from(SPEC, {"task": {"m": m, "L": L, "cluster": cluster},
                              "model": {"d_model": d, "W_V": W_V, "embeddings": emb},
                              "optim": {"lr": lr, "steps": steps}, "eval": {"n_eval": n_eval}, "seed": seed})


def grids(scale: str) -> dict[str, list]:
    """Family -> configs (every seed listed) for ``scale``."""
    s = SCALES[scale]
    n = s.seeds
    cfg = functools.partial(_cfg, n_eval=s.n_eval, steps=s.steps)
    g: dict[str, list] = {k: [] for k in ("standard", "dim_freeze", "dim_no_freeze", "cluster", "length",
                                          "with_wv_low_dim", "no_wv_low_dim")}
    for m in s.ms:
        g["standard"] += [cfg(m, s.big_d, s.big_L, 1e-3, e) for e in range(n["standard"])]
        for d in s.dims:
            for emb, fam in (("frozen", "dim_freeze"), ("trained", "dim_no_freeze")):
                g[fam] += [cfg(m, d, s.big_L, dim_lr(m, d), e, emb=emb) for e in range(n["dim"])]
        for c in (1, 2):
            g["cluster"] += [cfg(m, s.big_d, s.big_L, 1e-3, e, cluster=c) for e in range(n["cluster"])]
        for d in s.length_dims:
            for L in s.lengths:
                for lr in (1e-2, 1e-3):
                    g["length"] += [cfg(m, d, L, lr, e) for e in range(n["length"])]
        for L in (64, 128):
            g["with_wv_low_dim"] += [cfg(m, 64, L, 1e-2, e) for e in range(n["low_dim"])]
            for d in ((64,) if L == 64 else (32, 64, 96)):
                g["no_wv_low_dim"] += [cfg(m, d, L, 1e-2, e, W_V="identity")
                                       for e in range(n["low_dim"])]
    return g


def _children_cpu() -> float:
    """User + system CPU seconds of finished child processes (the worker pool)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def figure_names(scale: str) -> list[str]:
    """The figure files (without extension) ``reproduce`` draws at ``scale``: the paper's file names for
    the m values (and d values) of the scale's grid, plus ``reference_decoders``."""
    s = SCALES[scale]
    top = s.ms[-2:]
    ham = [d for d in (16, 32, 64) if d in s.dims] or list(s.dims[:3])
    spec = [d for d in (32, 64) if d in s.dims] or list(s.dims[:2])
    n_spec = min(4, s.seeds["dim"])
    names = ["Wv_bar_l64", "Wv_bar_l128", "reference_decoders"]
    names += [f"hamming_inner_n{m}" for m in top] + [f"no_wv_hamming_inner_n{m}" for m in s.ms]
    names += [f"spectrum_n{m}_d{d}_e{e}" for m in top for d in spec for e in range(n_spec) if ham]
    names += [f"heat_map_n{m}_c{c}" for c in (1, 2) for m in s.ms if c < m]
    for m in s.ms:
        names += [f"wv_replace_dim_n{m}", f"wv_angle_dim_n{m}", f"dim_n{m}", f"confusion_bar_l{m}", f"length_n{m}"]
    return names


def cost(c) -> float:
    """Rough per-run cost (multiply-adds per step) used to start the biggest jobs first."""
    V, d, L = 2 ** c.task.m + 1, c.model.d_model, c.task.L
    return 3 * V * d * d + 2 * V * V * d + 256 * V * min(V, 2 * d) + 256 * L * 20





def reproduce(out_dir, scale: str = "quick", jobs: int | None = None, force: bool = False,
              families: list[str] | None = None, backend=None) -> findings.Section:
    """Train what is missing, analyse, draw every figure family; returns the report's Section."""
    if scale not in SCALES:
        raise ValueError(f"scale: {scale!r} is not allowed (allowed: {', '.join(SCALES)})")
    out = Path(out_dir)
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    workers = jobs if jobs is not None else (os.cpu_count() or 1)
    backend = backend or LocalBackend(workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = grids(scale)
        configs = sorted({run_id(SPEC, c): c for cs in g.values() for c in cs}.values(),
                         key=cost, reverse=True)
        store = RunStore(out)
        rep = run_configs(SPEC, configs, store, backend=backend, force=force, desc="elephants")
        t_train = time.perf_counter() - t0
        cpu_workers = _children_cpu() - k0
        runs = Runs(store, g)
        sec = findings.Section("elephants", "Do LLMs dream of elephants? Latent concept association (synthetic)",
                             intro=INTRO.format(scale=scale))
        timings = {}
        for name, fn in FAMILIES.items():
            if families and name not in families:
                continue
            ta = time.perf_counter()
            sec.families.append(fn(runs, SCALES[scale], out))
            timings[name] = round(time.perf_counter() - ta, 1)
        sec.families.append(closing_note(sec, scale))
        sec.meta = findings.run_meta(
            scale=scale, workers=f"{workers} process(es) x 1 torch thread",
            runs=f"{len(configs)} ({rep.ran} trained now, {rep.skipped} reused, {rep.failed} failed)",
            excluded_from_analyses=runs.excluded or "none",
            seeds=", ".join(f"{k}: {v}" for k, v in SCALES[scale].seeds.items()),
            n_eval=SCALES[scale].n_eval,
            train_wall_s=round(t_train, 1),
            analysis_wall_s=timings,
            total_wall_s=round(time.perf_counter() - t0, 1),
            driver_cpu_s=round(time.process_time() - c0, 1),
            worker_cpu_s=round(cpu_workers, 1),
            train_job_wall_s_sum=round(float(runs.df["wall_s"].sum()) if "wall_s" in runs.df else math.nan, 1),
            note="wall times depend on the load of the machine; CPU times (driver: training in-process and "
                 "analyses; workers: training in worker processes) do much less. train_job_wall_s_sum adds "
                 "the wall time of every stored run's job, including runs reused from earlier invocations")
        return sec
    finally:
        torch.set_num_threads(threads)


# Known reasons for deviations (filled in from our paper-scale runs; matched by check-name prefix).
EXPLANATIONS: dict[str, str] = {
    "m=8 d=512 trained": "misses the ±0.03 tolerance by < 0.001 with sem 0.01 over 5 seeds (per seed "
                         "0.92-0.98): within 1 sem of agreeing; the largest model at lr 1e-3 varies most "
                         "across seeds after 500 steps.",
    "spectrum m=": "at d = 32 < 2^m the largest gap of the spectrum comes after 6-7 singular values, "
                   "not m or m+1: the Hamming (rank m+1) structure is approximate and our knee criterion "
                   "(largest ratio s_k/s_k+1) picks an earlier gap; the plots still show a few dominant values.",
    "m=5 c=2": "with m = 5 and c = 2 each cluster holds only 8 tokens; the four blocks are visible but the "
               "in/off-block ratio (1.7) is below our 2x threshold (the paper judges this visually).",
}


def closing_note(sec: findings.Section, scale: str) -> findings.Family:
    """A last family whose text names every check that disagrees or fails, with the known reason."""
    bad = [c for c in sec.checks() if c.verdict in ("disagrees", "trend fails", "missing")]
    if not bad:
        text = f"Every check agrees or holds at {scale} scale."
    else:
        lines = [f"{len(bad)} of {len(sec.checks())} checks disagree or fail at {scale} scale:"]
        for c in bad:
            why = next((v for k, v in EXPLANATIONS.items() if c.name.startswith(k)), "no explanation recorded")
            lines.append(f"- {c.name} ({c.verdict}; ours {findings.fmt(c.ours)}, reference {c.reference_text()}): {why}")
        if scale != "paper":
            lines.append("At quick scale the grid is reduced (fewer seeds, smaller d and L for some families); "
                         "run --scale paper for the comparison the checks are meant for.")
        text = "\n\n".join(lines)
    return findings.Family("Closing note", text=text)


INTRO = """Scale: {scale}. Every figure of the synthetic part of the paper (Jiang, Rajendran, Ravikumar, \
Aragam, NeurIPS 2024), produced from runs trained with the authors' protocol (AdamW, constant LR, batch 256, \
500 steps, β = 1, ρ = 0.5). Numbers are means over seeds with the standard error of the mean; evaluation \
uses fresh sequences from each run's evaluation seed. The reference column names each number's source: \
(paper), (authors' code) or (ours, derived). Verdicts: agrees/disagrees only for numbers from the paper or \
its code (tolerance from the spec), trend holds/fails for qualitative claims and stated laws, reference for \
our own derived numbers (the reference decoders and Bayes accuracies), which are shown, not judged. At quick scale the grid, seeds and some settings are reduced, so numeric \
verdicts there are indicative only."""

