"""Figures of the mechanism lab: each takes one of :mod:`explain` / :mod:`explain_patch`'s tables and
returns a matplotlib Figure (save with :func:`assocmem.plots.save`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..plots import COLORS, figure, line_with_band, new_figure


def _label(r) -> str:
    c = r["component"]
    return {"head": f"L{r['layer']}H{r['head']}", "mlp": f"MLP{r['layer']}", "resid": f"resid{r['layer']}",
            "attn_bias": f"bias{r['layer']}"}.get(c, c)


@figure("explain_{model}_lens")
def plot_logit_lens(lens: pd.DataFrame, title: str = "") -> "object":
    """Mean margin (±sem over records) read from each layer's residual, one line per k."""
    fig, ax = new_figure()
    for j, (k, g) in enumerate(lens.groupby("k")):
        s = g.groupby("layer")["margin"].agg(["mean", "sem"])
        line_with_band(ax, s.index, s["mean"], s["sem"], f"k={k}", COLORS[j % len(COLORS)])
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="layer (0 = embeddings)", ylabel="log p(new) - log p(true)", title=title or "logit lens")
    ax.legend()
    return fig


@figure("explain_{model}_cue")
def plot_cue_attention(cc: pd.DataFrame, k: int | None = None, title: str = "") -> "object":
    """Heat maps (layer x head) at one k: mean attention mass on the cue, and its correlation with margin."""
    k = int(cc["k"].max()) if k is None else k
    d = cc[cc["k"] == k]
    fig, axes = new_figure(ncols=2, figsize=(8.5, 3.8))
    for ax, col, cmap, lim in ((axes[0], "mass", "viridis", None), (axes[1], "corr", "RdBu_r", 1.0)):
        grid = d.pivot(index="layer", columns="head", values=col).sort_index()
        im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap=cmap,
                       vmin=-lim if lim else None, vmax=lim)
        ax.set(xlabel="head", ylabel="layer", title=f"{col} (k={k})")
        ax.grid(False)
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    return fig


@figure("explain_{model}_dla")
def plot_dla(rank: pd.DataFrame, top: int = 15, title: str = "") -> "object":
    """Mean direct logit attribution at the smallest and largest k of the components that shift most."""
    r = rank.head(top).iloc[::-1]
    kcols = [c for c in r.columns if c.startswith("k") and c[1:].isdigit()]
    fig, ax = new_figure(figsize=(5.5, 0.25 * len(r) + 1.2))
    y = np.arange(len(r))
    for j, c in enumerate((kcols[0], kcols[-1])):
        ax.barh(y + (j - 0.5) * 0.4, r[c], height=0.4, label=c.replace("k", "k="), color=COLORS[j])
    ax.set_yticks(y, [_label(x) for _, x in r.iterrows()])
    ax.axvline(0, color="k", lw=0.6)
    ax.set(xlabel="contribution to the margin (logits)", title=title or "direct logit attribution")
    ax.legend()
    return fig


@figure("explain_{model}_patch")
def plot_patching(rank: pd.DataFrame, top: int = 15, title: str = "") -> "object":
    """Fraction of the margin moved by patching each component, top components of each direction."""
    fig, axes = new_figure(ncols=2, figsize=(8.5, 0.25 * top + 1.2))
    for ax, (direction, g) in zip(np.atleast_1d(axes), rank.groupby("direction")):
        g = g[g["component"] == "head"].head(top).iloc[::-1]
        ax.barh(np.arange(len(g)), g["frac"], color=COLORS[0])
        ax.set_yticks(np.arange(len(g)), [_label(x) for _, x in g.iterrows()])
        ax.axvline(0, color="k", lw=0.6)
        ax.set(xlabel="fraction of margin moved", title=direction)
    if title:
        fig.suptitle(title)
    return fig


@figure("explain_{model}_ablation")
def plot_ablation(ab: pd.DataFrame, title: str = "") -> "object":
    """Left: ES vs k with the top-h heads mean-ablated. Right: ES drop at the largest k vs the clean cost
    (increase of next-token loss on the neutral text)."""
    fig, axes = new_figure(ncols=2, figsize=(8.5, 3.6))
    for j, (h, g) in enumerate(ab.groupby("h")):
        axes[0].plot(g["k"], g["es"], marker="o", ms=3.5, color=COLORS[j % len(COLORS)], label=f"h={h}")
    axes[0].set(xlabel="k", ylabel="ES", title="ES with top-h heads ablated", ylim=(0, 1))
    axes[0].legend()
    K = ab["k"].max()
    at = ab[ab["k"] == K].set_index("h")
    base = at.loc[0] if 0 in at.index else at.iloc[0]
    axes[1].plot(at["neutral_loss"] - base["neutral_loss"], base["es"] - at["es"], marker="o", color=COLORS[1])
    for h, r in at.iterrows():
        axes[1].annotate(f"h={h}", (r["neutral_loss"] - base["neutral_loss"], base["es"] - r["es"]), fontsize=8)
    axes[1].set(xlabel="neutral-text loss increase (nats)", ylabel=f"ES drop at k={K}", title="trade-off")
    if title:
        fig.suptitle(title)
    return fig


@figure("explain_{model}_ov")
def plot_ov(ov: pd.DataFrame, title: str = "") -> "object":
    """Median rank (log scale) of the cue token itself and of same-relation answers under each top head's
    OV circuit; chance = half the vocabulary."""
    g = ov.groupby(["layer", "head"]).agg(own=("rank_self", "median"), rel=("rank_relation", "median"),
                                          V=("n_vocab", "first")).reset_index()
    fig, ax = new_figure()
    y = np.arange(len(g))
    ax.barh(y - 0.2, g["own"] + 1, height=0.4, label="target token itself", color=COLORS[0])
    ax.barh(y + 0.2, g["rel"] + 1, height=0.4, label="same-relation answers", color=COLORS[2])
    ax.axvline(g["V"].iloc[0] / 2, color="k", ls="--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yticks(y, [f"L{a}H{b}" for a, b in zip(g["layer"], g["head"])])
    ax.set(xlabel="median rank + 1 (1 = top)", title=title or "OV circuit: where the cue is sent")
    ax.legend()
    return fig


@figure("explain_{model}_concept")
def plot_concept(cc: pd.DataFrame, title: str = "") -> "object":
    """Mean change (±sem) of first-token log-prob from k = 0 to K when another answer is named."""
    fig, ax = new_figure()
    cols = ["d_other", "d_new", "d_true"]
    m, s = cc[cols].mean(), cc[cols].sem()
    ax.bar(range(3), m, yerr=s, color=COLORS[:3])
    ax.set_xticks(range(3), ["named answer", "unnamed same-relation\nanswer (target_new)", "true answer"])
    ax.axhline(0, color="k", lw=0.6)
    ax.set(ylabel="Δ log p (k=K minus k=0)", title=title or "concept-level control")
    return fig
