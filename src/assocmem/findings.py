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
SOURCES = ("paper", "code", "derived")
# how the reference column names each source
SOURCE_LABEL = {"paper": "paper", "code": "authors' code", "derived": "ours, derived"}
DERIVED_NOTE = "ours (derived): shown, not judged; the law rows are judged"


@dataclasses.dataclass
class Check:
    """One row of a family's table.

    verdict: agrees/disagrees (numeric, ``|ours - reference| <= tol``, only against a number from the
    paper or the authors' code), trend holds/fails (a law tested on our data), trend only (no reference
    number; ours shown), reference (the reference is our own derived number, or a theory value: shown,
    not judged), missing (could not be computed).

    source: where ``reference`` comes from, one of :data:`SOURCES` ("paper", "code" = the authors'
    code, "derived" = ours); None exactly when there is no reference value.
    """
    name: str
    ours: float | str | None
    verdict: str
    reference: float | str | None = None
    sem: float | None = None
    tol: float | None = None
    note: str = ""
    source: str | None = None

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict: {self.verdict!r} is not allowed (allowed: {', '.join(VERDICTS)})")
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"source: {self.source!r} is not allowed (allowed: {', '.join(SOURCES)}, or None)")
        if (self.reference is None) != (self.source is None):
            raise ValueError(f"{self.name}: a reference value needs a source and a source needs a reference value "
                             f"(reference {self.reference!r}, source {self.source!r})")
        if self.source == "derived" and self.verdict in ("agrees", "disagrees"):
            raise ValueError(f"{self.name}: a derived number is a reference, never agrees/disagrees")

    def reference_text(self) -> str:
        """The reference value with its source, e.g. ``0.91 (paper)``; "–" when there is none."""
        if self.reference is None:
            return fmt(None)
        return f"{fmt(self.reference)} ({SOURCE_LABEL[self.source]})"


def compare(name: str, ours: float | None, reference: float, tol: float, sem: float | None = None,
            note: str = "", *, source: str) -> Check:
    """Numeric check against ``reference`` from ``source``: agrees when ``|ours - reference| <= tol``.

    With ``source="derived"`` (our own number) the verdict is ``reference``: ours, the reference and tol
    stay visible and the note says that the law checks beside it are what is judged."""
    if ours is None or (isinstance(ours, float) and math.isnan(ours)):
        return Check(name, None, "missing", reference, sem, tol, note, source)
    if source == "derived":
        return Check(name, ours, "reference", reference, sem, tol, f"{note}; {DERIVED_NOTE}" if note else DERIVED_NOTE,
                     source)
    return Check(name, ours, "agrees" if abs(ours - reference) <= tol else "disagrees", reference, sem, tol, note,
                 source)


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


def trend(name: str, holds: bool, ours: Any = None, reference: Any = None, note: str = "",
          source: str | None = None) -> Check:
    """Qualitative check: a law evaluated on our data (``reference``, if given, from ``source``)."""
    return Check(name, ours, "trend holds" if holds else "trend fails", reference, note=note, source=source)


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
