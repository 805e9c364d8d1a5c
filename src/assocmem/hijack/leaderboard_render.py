"""Render a hijack :class:`~assocmem.hijack.leaderboard.Board`: markdown and HTML tables, one figure."""
from __future__ import annotations

import html
import math

import pandas as pd

from ..plots import figure

COLUMNS = [   # (header, function of a summary row -> text)
    ("model", lambda r: r["model"] + (f" ({r['dtype']})" if r.get("dtype") not in ("", "float32", None) else "")),
    ("scheme", lambda r: r["scheme"] + ("" if r["relation"] == "all" else f" [{r['relation']}]")),
    ("n", lambda r: f"{int(r['n'])}"),
    ("ES k=0", lambda r: _f(r.get("es_k0"))),
    ("ES k=1", lambda r: _f(r.get("es_k1"))),
    ("ES k=K", lambda r: f"{_f(r.get('es_kmax'))} (K={_i(r.get('kmax'))})"),
    ("k50 [95% CI]", lambda r: f"{_k(r.get('k50'), r)} [{_k(r.get('k50_lo'), r)}, {_k(r.get('k50_hi'), r)}]"),
    ("AUC [95% CI]", lambda r: f"{_f(r.get('auc'))} [{_f(r.get('auc_lo'))}, {_f(r.get('auc_hi'))}]"),
    ("drop k=0→K", lambda r: _f(r.get("drop"), signed=True)),
    ("NS k=0 / K", lambda r: "–" if not r.get("n_ns") else f"{_f(r.get('ns_k0'))} / {_f(r.get('ns_kmax'))}"),
    ("control ES k=1 / K", lambda r: "" if _nan(r.get("control_es_kmax"))
     else f"{_f(r.get('control_es_k1'))} / {_f(r.get('control_es_kmax'))}"),
    ("target-specific k=1 / K [CI at K]", lambda r: "" if _nan(r.get("specific_kmax"))
     else f"{_f(r.get('specific_k1'), True)} / {_f(r.get('specific_kmax'), True)} "
          f"[{_f(r.get('specific_kmax_lo'), True)}, {_f(r.get('specific_kmax_hi'), True)}]"),
]
REL_COLUMNS = [("model", lambda r: r["model"]), ("scheme", lambda r: r["scheme"]),
               ("relation", lambda r: r["relation_id"]), ("n", lambda r: f"{int(r['n'])}"),
               ("ES k=0", lambda r: _f(r["es_k0"])), ("ES k=1", lambda r: _f(r["es_k1"])),
               ("ES k=K", lambda r: _f(r["es_kmax"])), ("k50", lambda r: _k(r["k50"], r)),
               ("AUC", lambda r: _f(r["auc"])), ("drop", lambda r: _f(r["drop"], signed=True))]
NOTE = ("ES: efficacy score (share of records where the false target has the lower mean per-token NLL). "
        "k50: smallest k with ES >= 0.5 ('>K': never within the grid), with a bootstrap 95% CI over records. "
        "AUC: trapezoid area under ES(k) divided by the k range (0..1). drop: ES(0) - ES(K) (the reverse "
        "drop on generic_true rows). NS: neighbourhood score on hijacked neighbourhood prompts. control: "
        "control_other ('Do not think of {other}.', another record's false target); target-specific = "
        "ES(generic_false) - ES(control_other), paired over records.")


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _f(v, signed: bool = False) -> str:
    return "–" if _nan(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _i(v) -> str:
    return "–" if _nan(v) else f"{int(v)}"


def _k(v, row) -> str:
    """A k50 value: the integer, or '>K' for +inf (never reached 0.5 up to the largest k)."""
    if _nan(v):
        return "–"
    return f">{int(row['kmax'])}" if math.isinf(v) else f"{int(v)}"


def _cells(df: pd.DataFrame, cols) -> pd.DataFrame:
    rows = [{h: fn(r) for h, fn in cols} for r in df.to_dict("records")]
    return pd.DataFrame(rows, columns=[h for h, _ in cols])


def _md(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    sep = "|" + "|".join("---" for _ in table.columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
                                    for row in table.itertuples(index=False)])


def to_markdown(board, relations: bool = True) -> str:
    """The summary table (and the per-relation table) as markdown, with a one-paragraph legend."""
    out = [_md(_cells(board.summary, COLUMNS)), "", NOTE]
    if relations and len(board.relations):
        out += ["", "Per relation (relation ids are heuristic labels of the data file):", "",
                _md(_cells(board.relations, REL_COLUMNS))]
    return "\n".join(out) + "\n"


def to_html(board) -> str:
    """A small self-contained HTML page with both tables."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>hijack leaderboard</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}</style>",
             "</head><body><h1>Hijackability leaderboard</h1>",
             _cells(board.summary, COLUMNS).to_html(index=False, escape=True),
             f"<p>{html.escape(NOTE)}</p><img src='leaderboard.png' alt='ES(k) per model and scheme'>"]
    if len(board.relations):
        parts += ["<h2>Per relation</h2>", _cells(board.relations, REL_COLUMNS).to_html(index=False, escape=True)]
    return "\n".join(parts + ["</body></html>"]) + "\n"


@figure("leaderboard")
def figure(curves: pd.DataFrame):
    """ES(k) with its 95% band, one panel per scheme, one line per model; k50 marked by a triangle
    on the 0.5 line (read off each curve: the smallest k with ES >= 0.5)."""
    from .. import plots
    order = ["generic_false", "control_other", "generic_true"]
    schemes = sorted(curves["scheme"].unique(), key=lambda s: (order.index(s) if s in order else 9, s)) \
        if len(curves) else []
    ncol = max(1, min(3, len(schemes)))
    nrow = max(1, math.ceil(len(schemes) / ncol))
    fig, axes = plots.new_figure(nrows=nrow, ncols=ncol, squeeze=False, sharey=True,
                                 figsize=(4.2 * ncol, 3.3 * nrow))
    models = sorted({(m, d) for m, d in zip(curves.get("model", []), curves.get("dtype", []))})
    colors = {md: plots.COLORS[i % len(plots.COLORS)] for i, md in enumerate(models)}
    for ax, scheme in zip(axes.flat, schemes):
        sub = curves[curves["scheme"] == scheme]
        for (model, dtype, rel), c in sub.groupby(["model", "dtype", "relation"], sort=True):
            c = c.sort_values("k")
            label = model + ("" if dtype in ("", "float32") else f" {dtype}") + ("" if rel == "all" else f" {rel}")
            color = colors[(model, dtype)]
            hit = c[c["es"] >= 0.5]
            k50 = f"{int(hit['k'].iloc[0])}" if len(hit) else f">{int(c['k'].max())}"
            ax.plot(c["k"], c["es"], marker="o", ms=3, color=color,
                    label=f"{label} (n={int(c['n'].iloc[0])}, k50={k50})")
            ax.fill_between(c["k"], c["es_lo"], c["es_hi"], color=color, alpha=0.15, linewidth=0)
            if len(hit):
                ax.plot([hit["k"].iloc[0]], [0.5], marker="v", ms=9, color=color, linestyle="none")
        ax.axhline(0.5, color="gray", lw=0.8, ls=":")
        ax.set_title(scheme)
        ax.set_xlabel("Number of prepends k")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("Efficacy Score")
    for ax in list(axes.flat)[len(schemes):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig

