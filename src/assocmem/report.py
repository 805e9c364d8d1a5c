"""Reproduction reports: every paper contributes a :class:`Section`; :func:`write_report` renders it
as ``report.md`` and ``report.html`` beside its figures, and :func:`write_index` links many.

A section is a list of figure families. Each family shows its images and a table of checks: our
value next to the paper's (where known), the sem over seeds, the tolerance and a verdict.
"""
from __future__ import annotations

import dataclasses
import html
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write_text

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


def _fmt(x: Any) -> str:
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


def _table_rows(checks: Sequence[Check]) -> list[list[str]]:
    return [[c.name, _fmt(c.ours), _fmt(c.sem), _fmt(c.paper), _fmt(c.tol), c.verdict, c.note] for c in checks]


HEADER = ["check", "ours", "sem", "paper", "tol", "verdict", "note"]


def to_markdown(section: Section) -> str:
    lines = [f"# {section.title}", ""]
    if section.intro:
        lines += [section.intro, ""]
    tally = section.tally()
    lines += ["**Summary:** " + ", ".join(f"{v}: {n}" for v, n in sorted(tally.items())), ""]
    for fam in section.families:
        lines += [f"## {fam.title}", ""]
        if fam.text:
            lines += [fam.text, ""]
        for fig in fam.figures:
            lines += [f"![{Path(fig).stem}]({fig})", ""]
        if fam.checks:
            lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
            lines += ["| " + " | ".join(r) + " |" for r in _table_rows(fam.checks)]
            lines.append("")
    if section.meta:
        lines += ["## Run metadata", ""] + [f"- **{k}**: {v}" for k, v in section.meta.items()] + [""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}.agrees,.trend-holds{background:#e6f6e6}.disagrees,.trend-fails,.missing{background:#fbe3e3}
.figs{display:flex;flex-wrap:wrap;gap:8px}.figs img{max-width:340px;border:1px solid #eee}"""


def to_html(section: Section) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(section.title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{e(section.title)}</h1>"]
    if section.intro:
        parts.append("".join(f"<p>{e(p)}</p>" for p in section.intro.split("\n\n")))
    tally = section.tally()
    parts.append("<p><b>Summary:</b> " + e(", ".join(f"{v}: {n}" for v, n in sorted(tally.items()))) + "</p>")
    for fam in section.families:
        parts.append(f"<h2>{e(fam.title)}</h2>")
        if fam.text:
            parts.append("".join(f"<p>{e(p)}</p>" for p in fam.text.split("\n\n")))
        if fam.figures:
            parts.append("<div class='figs'>" + "".join(
                f"<a href='{e(f)}'><img src='{e(f)}' alt='{e(Path(f).stem)}' title='{e(Path(f).stem)}'></a>"
                for f in fam.figures) + "</div>")
        if fam.checks:
            parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in HEADER) + "</tr>")
            for c, row in zip(fam.checks, _table_rows(fam.checks)):
                cls = c.verdict.replace(" ", "-")
                parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>")
            parts.append("</table>")
    if section.meta:
        parts.append("<h2>Run metadata</h2><ul>" + "".join(
            f"<li><b>{e(str(k))}</b>: {e(str(v))}</li>" for k, v in section.meta.items()) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(section: Section, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; figure paths are relative to it."""
    out = Path(out_dir)
    missing = [f for fam in section.families for f in fam.figures if not (out / f).exists()]
    if missing:
        raise FileNotFoundError(f"figures referenced by the report do not exist: {missing[:3]}")
    md, ht = out / "report.md", out / "report.html"
    atomic_write_text(md, to_markdown(section))
    atomic_write_text(ht, to_html(section))
    return md, ht


def write_index(entries: Sequence[tuple[Section, str]], out_dir: str | Path) -> Path:
    """``index.html`` (and ``index.md``) linking each section's report (path relative to out_dir)."""
    out = Path(out_dir)
    e = html.escape
    rows_md, rows_html = [], []
    for sec, rel in entries:
        tally = ", ".join(f"{v}: {n}" for v, n in sorted(sec.tally().items()))
        rows_md.append(f"| [{sec.title}]({rel}) | {tally} |")
        rows_html.append(f"<tr><td><a href='{e(rel)}'>{e(sec.title)}</a></td><td>{e(tally)}</td></tr>")
    md = "# assocmem reproduction\n\n| paper | checks |\n|---|---|\n" + "\n".join(rows_md) + "\n"
    ht = (f"<!doctype html><html><head><meta charset='utf-8'><title>assocmem reproduction</title>"
          f"<style>{_CSS}</style></head><body><h1>assocmem reproduction</h1><table>"
          "<tr><th>paper</th><th>checks</th></tr>" + "".join(rows_html) + "</table></body></html>")
    atomic_write_text(out / "index.md", md)
    atomic_write_text(out / "index.html", ht)
    return out / "index.html"
