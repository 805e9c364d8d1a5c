"""Shared figure style, the figure registry and saving.

Plotting functions elsewhere take a DataFrame and return a Figure. Each declares, with
``@figure("name_{field}", ...)``, the file names its figures are saved under; :data:`FIGURES` maps
every such pattern to the function, docs/DEVELOPING.md's figure index is generated from it, and
:func:`save` refuses a name no function declares. :func:`save` writes PNG and PDF (temp file + rename,
readable by all under umask 022) and closes the figure."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .io import atomic_write  # noqa: E402

STYLE = {
    "figure.figsize": (5.0, 3.6),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "savefig.bbox": "tight",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.fontsize": 9,
    "legend.frameon": False,
}
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


FIGURES: dict[str, str] = {}      # file-name pattern -> "module.function" that draws it


def figure(*patterns: str) -> Callable:
    """Declare the file names (``{field}`` marks a variable part) of the figures a plotting function draws."""
    def register(fn: Callable) -> Callable:
        name = f"{fn.__module__}.{fn.__qualname__}"
        for pattern in patterns:
            if FIGURES.get(pattern, name) != name:
                raise ValueError(f"figure {pattern!r} is declared by {FIGURES[pattern]} and {name}")
            FIGURES[pattern] = name
        return fn
    return register


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", pattern)
    return re.compile(".+?".join(re.escape(p) for p in parts))


def builder_of(name: str) -> str | None:
    """The function registered for the figure file ``name`` (no extension), or None."""
    hits = [fn for pattern, fn in FIGURES.items() if _regex(pattern).fullmatch(name)]
    return hits[0] if len(hits) == 1 else None


def new_figure(**kwargs) -> tuple[plt.Figure, plt.Axes]:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(**kwargs)
    return fig, ax


def line_with_band(ax: plt.Axes, x: Sequence[float], mean: Sequence[float], sem: Sequence[float] | None,
                   label: str, color: str | None = None, **kwargs) -> None:
    """A line with a shaded ±sem band (the paper's error-band style)."""
    import numpy as np
    x, mean = np.asarray(x, float), np.asarray(mean, float)
    (line,) = ax.plot(x, mean, marker="o", ms=3.5, label=label, color=color, **kwargs)
    if sem is not None:
        s = np.nan_to_num(np.asarray(sem, float))
        ax.fill_between(x, mean - s, mean + s, color=line.get_color(), alpha=0.2, linewidth=0)


def save(fig: plt.Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``out_dir/name.{png,pdf}`` atomically, close the figure, return the paths.

    ``name`` must match exactly one pattern declared with :func:`figure` (ValueError otherwise)."""
    if builder_of(name) is None:
        raise ValueError(f"figure {name!r}: no plotting function declares it with @plots.figure(...)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(STYLE):
        for fmt in formats:
            paths.append(atomic_write(out / f"{name}.{fmt}", lambda tmp: fig.savefig(tmp, format=fmt)))
    plt.close(fig)
    return paths
