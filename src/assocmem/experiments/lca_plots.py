"""Plotting functions for the LCA figures of "Do LLMs dream of elephants?": each takes a tidy
DataFrame and returns a matplotlib Figure in the shared style (:mod:`assocmem.plots`); axes, series
names and scales follow the authors' plotting scripts as described in the spec.

Summary frames have columns ``mean`` and ``sem`` (over seeds) plus the x / series columns named below.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import plots


def _lines(df: pd.DataFrame, x: str, series: str, xlabel: str, ylabel: str, *, logx: bool = False,
           order=None, label=lambda s: str(s), title: str | None = None):
    fig, ax = plots.new_figure()
    keys = order if order is not None else sorted(df[series].unique())
    for i, key in enumerate(keys):
        g = df[df[series] == key].sort_values(x)
        if g.empty:
            continue
        plots.line_with_band(ax, g[x], g["mean"], g["sem"], label=label(key), color=plots.COLORS[i % 8])
    if logx:
        ax.set_xscale("log", base=2)
        xs = sorted(df[x].unique())
        ax.set_xticks(xs, [str(int(v)) for v in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return fig, ax


def _bars(df: pd.DataFrame, x: str, series: str, order, xlabel: str, ylabel: str, *, legend_loc="lower left",
          fmt=lambda v: str(v)):
    fig, ax = plots.new_figure()
    xs = sorted(df[x].unique())
    width = 0.8 / len(order)
    for i, key in enumerate(order):
        g = df[df[series] == key].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (i - (len(order) - 1) / 2) * width
        ax.bar(pos, g["mean"], width, yerr=g["sem"].fillna(0), capsize=2, ecolor="black", label=key,
               color=plots.COLORS[i % 8])
    ax.set_xticks(np.arange(len(xs)), [fmt(v) for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.legend(loc=legend_loc)
    return fig


@plots.figure("Wv_bar_l{L}")
def wv_bar(df: pd.DataFrame):
    """Wv_bar_l*: columns m, variant ("Identity Wv" | "Trained Wv"), mean, sem."""
    return _bars(df, "m", "variant", ["Identity Wv", "Trained Wv"], "Number of Latent Concepts", "Accuracy")


@plots.figure("confusion_bar_l{m}")
def confusion_bar(df: pd.DataFrame):
    """confusion_bar_l*: columns r, target ("Target True" | "Target False"), mean, sem."""
    return _bars(df, "r", "target", ["Target True", "Target False"], "Mixing Rate", "Accuracy",
                 legend_loc="center right", fmt=lambda v: f"{v:.1f}")


@plots.figure("hamming_inner_n{m}", "no_wv_hamming_inner_n{m}")
def hamming_inner(df: pd.DataFrame):
    """hamming_inner_n* / no_wv_hamming_inner_n*: columns distance, d, mean, sem."""
    fig, ax = _lines(df, "distance", "d", "Hamming Distance", "Average Inner Product",
                     label=lambda d: f"Dim={int(d)}")
    ax.set_xticks(sorted(df["distance"].unique()))
    return fig


@plots.figure("wv_replace_dim_n{m}")
def wv_replace(df: pd.DataFrame):
    """wv_replace_dim_n*: columns d, series ("Original" | "Constructed Wv" | "Random Wv"), mean, sem."""
    fig, ax = _lines(df, "d", "series", "Dimensions", "Accuracy", logx=True,
                     order=["Original", "Constructed Wv", "Random Wv"])
    ax.set_ylim(-0.02, 1.02)
    return fig


@plots.figure("wv_angle_dim_n{m}")
def wv_angle(df: pd.DataFrame):
    """wv_angle_dim_n*: columns d, series ("Constructed Wv" | "Random Wv" | "Gaussian Wv"), mean, sem."""
    fig, _ = _lines(df, "d", "series", "Dimensions", "Average Smallest Principal Angle", logx=True,
                    order=["Constructed Wv", "Random Wv", "Gaussian Wv"])
    return fig


@plots.figure("dim_n{m}")
def dim(df: pd.DataFrame, m: int):
    """dim_n*: columns d, series ("Frozen Embeddings" | "Trained Embeddings"), mean, sem; red dashed
    line at d = 2^m."""
    fig, ax = _lines(df, "d", "series", "Dimensions", "Accuracy", logx=True,
                     order=["Frozen Embeddings", "Trained Embeddings"])
    ax.axvline(2 ** m, color="red", ls="--", lw=1)
    ax.set_ylim(-0.02, 1.02)
    return fig


@plots.figure("spectrum_n{m}_d{d}_e{seed}")
def spectrum(df: pd.DataFrame):
    """spectrum_n*_d*_e*: columns index, value (singular values, descending)."""
    fig, ax = plots.new_figure()
    ax.plot(df["index"], df["value"], "o", color="tab:blue", ms=3.5)
    ax.set_xlabel("Index")
    ax.set_ylabel("Singular Value")
    ax.set_title("Spectrum of Embeddings")
    return fig


@plots.figure("length_n{m}")
def length(df: pd.DataFrame, bayes: pd.DataFrame | None = None):
    """length_n*: columns L, d, mean, sem; optional ``bayes`` frame (L, accuracy) drawn as a dashed
    Bayes-ceiling reference."""
    fig, ax = _lines(df, "L", "d", "Context Lengths", "Accuracy", logx=True, label=lambda d: f"Dim = {int(d)}")
    if bayes is not None and not bayes.empty:
        b = bayes.sort_values("L")
        ax.plot(b["L"], b["accuracy"], ls="--", color="gray", label="Bayes ceiling")
        ax.legend()
    ax.set_ylim(-0.02, 1.02)
    return fig


@plots.figure("heat_map_n{m}_c{c}")
def heat_map(df: pd.DataFrame):
    """heat_map_n*: a square DataFrame, rows = query tokens, columns = key tokens (rows sum to 1)."""
    fig, ax = plots.new_figure(figsize=(4.6, 3.8))
    im = ax.imshow(df.to_numpy(), cmap="viridis", aspect="equal", interpolation="nearest")
    ax.grid(False)
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("Key Tokens")
    ax.set_ylabel("Query Tokens")
    return fig


@plots.figure("reference_decoders")
def reference_decoders(df: pd.DataFrame):
    """df: decoder, m, L, accuracy. One colour per decoder, darker for larger m."""
    fig, ax = plots.new_figure()
    ms = sorted(df["m"].unique())
    for i, (dec, g) in enumerate(df.groupby("decoder", sort=False)):
        for m, gm in g.groupby("m"):
            ax.plot(gm["L"], gm["accuracy"], marker="o", ms=3, color=plots.COLORS[i],
                    alpha=0.4 + 0.15 * (m - ms[0]), label=dec if m == ms[-1] else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Context Lengths")
    ax.set_ylabel("Accuracy")
    ax.legend()
    return fig
