"""``assocmem hijack leaderboard``: a hijackability summary across models over stored scores.

Input: the per-record tables of the hijack score store (``ScoreStore(root).entries()``; one row
per case_id, k, kind, prompt_index with ``nll_new``/``nll_true``). Every number is computed here
from those raw NLLs, so a new summary needs no re-run. Per (model, dtype, scheme, relation filter)
the store entry with the most records is used (then the most k values).

Columns of the summary table (one row per model x scheme; ES = efficacy score, ROME's definition,
over the records scored at every k; CIs are 95% percentile bootstraps over records, paired across k):

- ``es_k0``, ``es_k1``, ``es_kmax``: ES at k = 0, k = 1 and the largest k of the run (``kmax``).
- ``k50``: the flip point, the smallest k of the run's grid with ES(k) >= 0.5; +inf when ES never
  reaches 0.5 (shown as ">K"). ``k50_lo``/``k50_hi``: the 2.5/97.5 percentiles of k50 over
  bootstrap resamples of the records (each resample's k50 read off its own mean curve; discrete
  order statistics, "never" counted as +inf).
- ``auc``: the normalised area under ES(k), the trapezoid rule over the k grid divided by
  ``kmax - kmin``, so it lies in [0, 1]: 1 = hijacked at every k, 0 = never (a single-k grid
  gives ES at that k).
- ``drop``: ES(k=0) - ES(kmax). Under the reverse scheme generic_true it is the reverse-hijack drop
  (positive = naming the true target makes the model pick it more often).
- ``ns_k0``, ``ns_kmax``: ROME's neighbourhood score on the hijacked neighbourhood prompts,
  mean over a record's prompts of 1[nll_true < nll_new], then over records (NaN without them).
- On generic_false rows: ``control_es_k1``/``control_es_kmax`` (ES of the control scheme
  control_other, "Do not think of {other}." with another record's false target) and
  ``specific_k1``/``specific_kmax`` = ES(generic_false) - ES(control_other), the target-specific
  effect, paired over the records both runs scored, with a CI at kmax.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import ConfigError
from . import evaluate

LEVEL = 0.95
CONTROL = ("generic_false", "control_other")       # (scheme, its control)


# ----------------------------------------------------------------------------------------- the maths

def k50(curve: Sequence[float], ks: Sequence[int]) -> int | None:
    """The smallest k with ES(k) >= 0.5 (``curve[i]`` is ES at ``ks[i]``, ks ascending); None if never."""
    for k, v in zip(ks, curve):
        if v >= 0.5:
            return int(k)
    return None


def auc(curve: Sequence[float], ks: Sequence[int]) -> float:
    """Trapezoid area under ES(k) over the k grid divided by (kmax - kmin): in [0, 1] for ES in [0, 1]."""
    y, x = np.asarray(curve, float), np.asarray(ks, float)
    if len(x) == 1:
        return float(y[0])
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def boot_curves(values: np.ndarray, n_boot: int = 1000, seed: int = 0, block: int = 50) -> np.ndarray:
    """[n_boot, conditions] means over rows resampled with replacement (the same draws as
    :func:`evaluate.bootstrap_ci` for the same seed), built in blocks to bound memory."""
    values = np.asarray(values, float)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, values.shape[1]))
    for b in range(0, n_boot, block):
        m = min(block, n_boot - b)
        out[b:b + m] = values[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return out


def _first_at_least(boots: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Per bootstrap curve, the smallest k with ES >= 0.5, +inf if none."""
    hit = boots >= 0.5
    first = np.asarray(ks, float)[hit.argmax(axis=1)]
    return np.where(hit.any(axis=1), first, np.inf)


def _pct(x: np.ndarray, discrete: bool = False) -> tuple[float, float]:
    a = (1 - LEVEL) / 2
    method = "inverted_cdf" if discrete else "linear"      # discrete: actual values, +inf allowed
    lo, hi = np.quantile(x, [a, 1 - a], method=method)
    return float(lo), float(hi)


def ns_per_record(df: pd.DataFrame) -> pd.DataFrame:
    """[case_id x k] NS: mean over a record's neighbourhood prompts of 1[nll_true < nll_new]."""
    if "ns" in evaluate.METRICS:
        return evaluate.per_record(df, "ns")
    d = df[df["kind"] == "neighborhood"]
    v = (d["nll_true"] < d["nll_new"]).astype(float)
    return d.assign(v=v).groupby(["case_id", "k"])["v"].mean().unstack("k").sort_index(axis=1)


def _at(curve: pd.Series, k: int) -> float:
    return float(curve[k]) if k in curve.index else math.nan


def curve_summary(m: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[dict, pd.DataFrame]:
    """Summary numbers and the curve (k, es, es_lo, es_hi) of a per-record ES matrix [case_id x k]."""
    m = m.dropna()
    ks = [int(k) for k in m.columns]
    if m.empty:
        return {"n": 0}, pd.DataFrame(columns=["k", "es", "es_lo", "es_hi"])
    vals = m.to_numpy(float)
    mean = pd.Series(vals.mean(axis=0), index=ks)
    boots = boot_curves(vals, n_boot, seed)
    a = (1 - LEVEL) / 2
    lo, hi = np.quantile(boots, a, axis=0), np.quantile(boots, 1 - a, axis=0)
    f50 = k50(mean.to_numpy(), ks)
    k50_lo, k50_hi = _pct(_first_at_least(boots, ks), discrete=True)
    areas = np.array([auc(b, ks) for b in boots])
    out = {"n": len(m), "kmin": ks[0], "kmax": ks[-1], "es_k0": _at(mean, 0), "es_k1": _at(mean, 1),
           "es_kmax": float(mean.iloc[-1]), "es_kmax_lo": float(lo[-1]), "es_kmax_hi": float(hi[-1]),
           "k50": math.inf if f50 is None else float(f50), "k50_lo": k50_lo, "k50_hi": k50_hi,
           "auc": auc(mean.to_numpy(), ks), "auc_lo": _pct(areas)[0], "auc_hi": _pct(areas)[1],
           "drop": _at(mean, 0) - float(mean.iloc[-1])}
    if 0 in ks:
        drops = boots[:, ks.index(0)] - boots[:, -1]
        out["drop_lo"], out["drop_hi"] = _pct(drops)
    curve = pd.DataFrame({"k": ks, "es": mean.to_numpy(), "es_lo": lo, "es_hi": hi})
    return out, curve


# --------------------------------------------------------------------------------------- the tables

@dataclasses.dataclass
class Board:
    summary: pd.DataFrame      # one row per model x scheme (see the module docstring)
    curves: pd.DataFrame       # one row per model x scheme x k: es, es_lo, es_hi, ns, n, control_es, specific...
    relations: pd.DataFrame    # one row per model x scheme x relation_id
    superseded: int = 0        # store entries not shown (a larger entry had the same key)


KEY = ["model", "dtype", "scheme", "relation"]


def _key(spec: dict) -> tuple:
    rel = spec.get("relation")
    rel = "all" if not rel else rel if isinstance(rel, str) else ",".join(rel)
    return (str(spec.get("model")), str(spec.get("dtype") or ""), str(spec.get("scheme")), rel)


def _pick(entries: Iterable[tuple[dict, pd.DataFrame]]) -> tuple[dict, int]:
    """{key: (spec, table)} keeping the entry with the most records, then the most k values."""
    best: dict[tuple, tuple[dict, pd.DataFrame]] = {}
    total = 0
    for spec, df in entries:
        total += 1
        rw = df[df["kind"] == "rewrite"]
        size = (rw["case_id"].nunique(), rw["k"].nunique(), str(spec.get("id", "")))
        key = _key(spec)
        if key not in best or size > best[key][0]:
            best[key] = (size, (spec, df))
    return {k: v[1] for k, v in sorted(best.items())}, total - len(best)


def relation_table(df: pd.DataFrame, key: dict) -> pd.DataFrame:
    """Per relation_id (None -> "none"): n, ES at k0/k1/kmax, k50, AUC, drop (no CIs)."""
    es = per_record_es(df).dropna()
    rel = df[df["kind"] == "rewrite"].drop_duplicates("case_id").set_index("case_id")["relation_id"]
    rel = rel.reindex(es.index).fillna("none").astype(str)
    ks = [int(k) for k in es.columns]
    rows = []
    for r, m in es.groupby(rel):
        mean = pd.Series(m.to_numpy(float).mean(axis=0), index=ks)
        f50 = k50(mean.to_numpy(), ks)
        rows.append({**key, "relation_id": r, "n": len(m), "kmax": ks[-1], "es_k0": _at(mean, 0),
                     "es_k1": _at(mean, 1), "es_kmax": float(mean.iloc[-1]),
                     "k50": math.inf if f50 is None else float(f50), "auc": auc(mean.to_numpy(), ks),
                     "drop": _at(mean, 0) - float(mean.iloc[-1])})
    return pd.DataFrame(rows)


def per_record_es(df: pd.DataFrame) -> pd.DataFrame:
    return evaluate.per_record(df, "es")


def leaderboard(entries: Iterable[tuple[dict, pd.DataFrame]], n_boot: int = 1000, seed: int = 0) -> Board:
    """Summary, curves and per-relation tables over (spec, per-record table) pairs."""
    chosen, superseded = _pick(entries)
    rows, curves, rels, mats = [], [], [], {}
    for key_t, (spec, df) in chosen.items():
        key = dict(zip(KEY, key_t))
        es = per_record_es(df).dropna()
        mats[key_t] = es
        summ, curve = curve_summary(es, n_boot, seed)
        ns = ns_per_record(df).dropna()
        ns_curve = ns.mean(axis=0) if len(ns) else pd.Series(dtype=float)
        summ |= {"ns_k0": _at(ns_curve, 0), "ns_kmax": _at(ns_curve, summ.get("kmax", -1)), "n_ns": len(ns)}
        rows.append({**key, **summ, "entry": str(spec.get("id", "")), "data": str(spec.get("data", "")),
                     "seed": spec.get("seed")})
        if len(ns):
            m, lo, hi = evaluate.bootstrap_ci(ns.to_numpy(float), n_boot=n_boot, seed=seed)
            nsd = pd.DataFrame({"k": [int(k) for k in ns.columns], "ns": m, "ns_lo": lo, "ns_hi": hi})
            curve = curve.merge(nsd, on="k", how="left")
        curves.append(curve.assign(**key, n=summ["n"], n_ns=len(ns)))
        rels.append(relation_table(df, key))
    summary = pd.DataFrame(rows)
    curves_df = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    for c in ("ns", "ns_lo", "ns_hi", "control_es", "specific", "specific_lo", "specific_hi"):
        if c not in curves_df:
            curves_df[c] = np.nan
    if len(summary):
        for c in ("control_es_k1", "control_es_kmax", "specific_k1", "specific_kmax", "specific_kmax_lo",
                  "specific_kmax_hi", "n_paired"):
            summary[c] = np.nan
        _control(summary, curves_df, mats, n_boot, seed)
    front = KEY + ["n", "kmin", "kmax"]
    summary = summary[front + [c for c in summary.columns if c not in front]] if len(summary) else summary
    return Board(summary, curves_df[KEY + [c for c in curves_df.columns if c not in KEY]] if len(curves_df)
                 else curves_df, pd.concat(rels, ignore_index=True) if rels else pd.DataFrame(), superseded)


def _control(summary: pd.DataFrame, curves: pd.DataFrame, mats: dict, n_boot: int, seed: int) -> None:
    """Fill the control columns of generic_false rows in place (paired over shared records and k)."""
    scheme, control = CONTROL
    for key_t, m in mats.items():
        model, dtype, sch, rel = key_t
        ctrl = mats.get((model, dtype, control, rel))
        if sch != scheme or ctrl is None:
            continue
        ids = m.index.intersection(ctrl.index)
        ks = [k for k in m.columns if k in ctrl.columns]
        if not len(ids) or not ks:
            continue
        diff = m.loc[ids, ks].to_numpy(float) - ctrl.loc[ids, ks].to_numpy(float)
        mean, lo, hi = evaluate.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
        c_mean = ctrl.loc[ids, ks].to_numpy(float).mean(axis=0)
        at = {int(k): i for i, k in enumerate(ks)}
        row = (summary[KEY] == pd.Series(dict(zip(KEY, key_t)))).all(axis=1)
        summary.loc[row, ["control_es_k1", "specific_k1"]] = [c_mean[at[1]], mean[at[1]]] if 1 in at else np.nan
        summary.loc[row, ["control_es_kmax", "specific_kmax", "specific_kmax_lo", "specific_kmax_hi", "n_paired"]] = \
            [c_mean[-1], mean[-1], lo[-1], hi[-1], len(ids)]
        crow = (curves[KEY] == pd.Series(dict(zip(KEY, key_t)))).all(axis=1)
        for k, i in at.items():
            sel = crow & (curves["k"] == k)
            curves.loc[sel, ["control_es", "specific", "specific_lo", "specific_hi"]] = [c_mean[i], mean[i],
                                                                                          lo[i], hi[i]]


# -------------------------------------------------------------------------------------- the store

def load_entries(root: str | Path, models: Sequence[str] | None = None) -> list[tuple[dict, pd.DataFrame]]:
    """(spec with its entry id, per-record table) of every finished store entry under ``root``."""
    from .store import ScoreStore
    out = []
    for e in ScoreStore(root).entries():
        spec = dict(e.spec)
        if models and spec.get("model") not in models:
            continue
        out.append((spec | {"id": e.id}, e.table()))
    return out


def write(board: Board, dest: str | Path) -> list[Path]:
    """leaderboard.parquet, curves.parquet, relations.parquet, leaderboard.{md,html}, leaderboard.{png,pdf}."""
    from .. import io, plots
    from .leaderboard_render import figure, to_html, to_markdown
    dest = Path(dest)
    paths = [io.atomic_write_parquet(board.summary, dest / "leaderboard.parquet"),
             io.atomic_write_parquet(board.curves, dest / "curves.parquet"),
             io.atomic_write_parquet(board.relations, dest / "relations.parquet"),
             io.atomic_write_text(dest / "leaderboard.md", to_markdown(board)),
             io.atomic_write_text(dest / "leaderboard.html", to_html(board))]
    figs = plots.save(figure(board.curves), dest, "leaderboard")
    for f in figs:            # plots.save renames mkstemp files (0600); give them the usual mode
        f.chmod(io.file_mode())
    return paths + figs


def _cmd(args) -> int:
    from .leaderboard_render import to_markdown
    models = [m.strip() for a in (args.models or []) for m in a.split(",") if m.strip()] or None
    root = Path(args.out)
    entries = load_entries(root, models) if (root / "scores").is_dir() else []
    if not entries:
        raise ConfigError(f"--out: {root} holds no finished hijack scores"
                          + (f" for models {', '.join(models)}" if models else "")
                          + " (run `assocmem hijack score ...` first)")
    board = leaderboard(entries, n_boot=args.n_boot, seed=args.seed)
    paths = write(board, Path(args.dest) if args.dest else root / "leaderboard")
    if args.json:
        print(json.dumps({"summary": json.loads(board.summary.to_json(orient="records")),
                          "files": [str(p) for p in paths]}))
        return 0
    print(to_markdown(board, relations=False))
    if board.superseded:
        print(f"({board.superseded} smaller store entries with the same model/scheme/relation not shown)")
    print(f"wrote {len(paths)} files to {paths[0].parent}")
    return 0


def add_parser(sub) -> None:
    """Register ``hijack leaderboard`` on the ``hijack`` sub-parsers."""
    p = sub.add_parser("leaderboard", help="hijackability summary over stored scores: ES at k=0/1/K, "
                       "flip point k50, AUC, reverse drop, NS, control scheme, per relation")
    p.add_argument("--out", default="assocmem-out/hijack", help="score store root (default assocmem-out/hijack)")
    p.add_argument("--dest", help="folder for the tables and figure (default OUT/leaderboard)")
    p.add_argument("--models", nargs="+", help="only these models (names as stored; commas or spaces)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", action="store_true", help="print the summary table as JSON")
    p.set_defaults(fn=_cmd)
