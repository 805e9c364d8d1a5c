"""Reproduction reports: :func:`write_report` renders one paper's :class:`~assocmem.findings.Section`
as ``report.md`` and ``report.html`` beside its figures, and :func:`write_index` links many.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from .findings import Check, Section, fmt
from .io import atomic_write_text


def _table_rows(checks: Sequence[Check]) -> list[list[str]]:
    return [[c.name, fmt(c.ours), fmt(c.sem), c.reference_text(), fmt(c.tol), c.verdict, c.note] for c in checks]


HEADER = ["check", "ours", "sem", "reference", "tol", "verdict", "note"]


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


# modules whose plotting functions declare figures (tests/test_figures.py keeps this list complete)
PLOT_MODULES = {
    "assocmem.experiments.lca_plots": "elephants",
    "assocmem.experiments.induction_plots": "induction",
    "assocmem.experiments.geometric_plots": "geometric",
    "assocmem.experiments.hijack": "hijack",
    "assocmem.hijack.explain_plots": "hijack (mechanism lab)",
    "assocmem.hijack.leaderboard_render": "hijack (leaderboard)",
}
INDEX_START, INDEX_END = "<!-- figure-index:start -->", "<!-- figure-index:end -->"


def figure_index() -> str:
    """A markdown table, figure file name -> the one function that draws it, read from the
    ``@plots.figure`` declarations (``{field}`` marks a variable part of the name)."""
    import importlib

    from .plots import FIGURES
    for module in PLOT_MODULES:
        importlib.import_module(module)
    rows = sorted((PLOT_MODULES[fn.rsplit(".", 1)[0]], pattern, fn) for pattern, fn in FIGURES.items())
    lines = ["| report | figure file (`figures/NAME.png`) | drawn by |", "|---|---|---|"]
    lines += [f"| {paper} | `{pattern}` | `{fn}` |" for paper, pattern, fn in rows]
    return "\n".join(lines)
