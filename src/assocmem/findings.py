"""What a reproduction finds: every paper's ``reproduce`` returns a :class:`Section` of figure
:class:`Family` objects, each with its figures and a table of :class:`Check` rows (our value, the
reference value, the sem over seeds, the tolerance and a verdict). :mod:`assocmem.report` renders them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
from typing import Any

VERDICTS = ("agrees", "disagrees", "trend holds", "trend fails", "trend only", "reference", "missing")


@dataclasses.dataclass
class Check:
    """One row of a family's table.

    verdict: agrees/disagrees (numeric, ``|ours - paper| <= tol``), trend holds/fails (qualitative
    claim tested on our data), trend only (no paper number; ours shown), reference (a theory value),
    missing (could not be computed).
    """
    name: str
    ours: float | str | None
    verdict: str
    paper: float | str | None = None
    sem: float | None = None
    tol: float | None = None
    note: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict: {self.verdict!r} is not allowed (allowed: {', '.join(VERDICTS)})")


def compare(name: str, ours: float | None, paper: float, tol: float, sem: float | None = None,
            note: str = "") -> Check:
    """Numeric check: agrees when ``|ours - paper| <= tol``."""
    if ours is None or (isinstance(ours, float) and math.isnan(ours)):
        return Check(name, None, "missing", paper, sem, tol, note)
    return Check(name, ours, "agrees" if abs(ours - paper) <= tol else "disagrees", paper, sem, tol, note)


def usable_runs(df, status: str = "status") -> tuple[Any, str]:
    """Rows of a store table that may enter averages (status ``ok``), and a note counting the rest.

    Diverged runs are stored with their measured metrics missing (None), so a plain mean would skip
    them silently; this makes the exclusion explicit. Returns ``(df_ok, note)``; ``note`` is "" when
    nothing was excluded, else e.g. "2 diverged runs excluded"."""
    if df is None or len(df) == 0 or status not in df.columns:
        return df, ""
    ok = df[status] == "ok"
    counts = df.loc[~ok, status].value_counts()
    note = ", ".join(f"{n} {s} run{'s' if n != 1 else ''} excluded" for s, n in sorted(counts.items()))
    return df[ok], note


def trend(name: str, holds: bool, ours: Any = None, paper: Any = None, note: str = "") -> Check:
    """Qualitative check: a claim evaluated on our data."""
    return Check(name, ours, "trend holds" if holds else "trend fails", paper, note=note)


@dataclasses.dataclass
class Family:
    """A figure family: its images (paths relative to the report folder), text and checks."""
    title: str
    figures: list[str] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)
    text: str = ""


@dataclasses.dataclass
class Section:
    """One paper's report."""
    key: str
    title: str
    intro: str = ""
    families: list[Family] = dataclasses.field(default_factory=list)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def checks(self) -> list[Check]:
        return [c for f in self.families for c in f.checks]

    def tally(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.checks():
            out[c.verdict] = out.get(c.verdict, 0) + 1
        return out


def fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def run_meta(**extra: Any) -> dict[str, Any]:
    """Versions and machine facts for a report's metadata block."""
    import numpy
    import torch
    from . import __version__
    return {"assocmem": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch threads": torch.get_num_threads(), **extra}
