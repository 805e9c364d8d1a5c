"""Figures of the geometric-recall reproduction. Each function takes a DataFrame and returns a Figure."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import plots
from ..tasks.geometric import log2_factorial


def _line_per_group(ax, df: pd.DataFrame, group: str, x: str, y: str, label: str = "{}") -> list[str]:
    """One line (markers, x ascending) per value of ``group``; returns the colours used, in order."""
    colors = []
    for i, (key, g) in enumerate(df.groupby(group)):
        g = g.sort_values(x)
        colors.append(plots.COLORS[i % len(plots.COLORS)])
        ax.plot(g[x], g[y], marker="o", color=colors[-1], label=label.format(key))
    return colors


@plots.figure("geo_e0_margin", "geo_e0_noise")
def margin_vs_d0(df: pd.DataFrame, y: str = "min_margin", title: str = "") -> plots.plt.Figure:
    """df: N, d0, <y> (mean over seeds), accuracy."""
    fig, ax = plots.new_figure()
    _line_per_group(ax, df, "N", "d0", y, "N={}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="block size d0", ylabel=y.replace("_", " "), title=title)
    ax.legend()
    return fig


@plots.figure("geo_e0_overlap")
def overlap_dstar(df: pd.DataFrame) -> plots.plt.Figure:
    """df: C, N, Dstar; guides 6*C*ln N and 9*C*ln N."""
    fig, ax = plots.new_figure()
    colors = _line_per_group(ax, df, "N", "C", "Dstar", "N={}")
    for (N, g), c in zip(df.groupby("N"), colors):
        C = np.sort(g["C"].to_numpy())
        ax.plot(C, 6 * C * math.log(N), ls=":", color=c, lw=1)
        ax.plot(C, 9 * C * math.log(N), ls="--", color=c, lw=1)
    ax.set(xlabel="superposed codes C", ylabel="D* (100% accuracy)",
           title="overlapping construction (dotted 6C ln N, dashed 9C ln N)")
    ax.legend()
    return fig


@plots.figure("geo_e1_acc_vs_d")
def acc_vs_d(df: pd.DataFrame) -> plots.plt.Figure:
    """df: runs with task.N, task.R, model.d_model, accuracy."""
    Rs = sorted(df["task.R"].unique())
    fig, axes = plots.new_figure(ncols=len(Rs), figsize=(4.2 * len(Rs), 3.4), squeeze=False)
    for ax, R in zip(axes[0], Rs):
        for i, (N, g) in enumerate(df[df["task.R"] == R].groupby("task.N")):
            s = g.groupby("model.d_model")["accuracy"].agg(["mean", "sem"]).reset_index()
            plots.line_with_band(ax, s["model.d_model"], s["mean"], s["sem"], f"N={N}", plots.COLORS[i % 8])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_ylabel("accuracy (all facts)")
        ax.set_title(f"R={R}")
        ax.legend()
    return fig


@plots.figure("geo_e1_dstar")
def dstar_vs_logN(df: pd.DataFrame, alpha: float | None, beta: float | None,
                  bits: tuple[int, ...] = (4, 8, 16)) -> plots.plt.Figure:
    """df: N, R, dstar; fit line alpha*R*log2 N + beta; counting bounds R*log2(N!)/(N*b)."""
    fig, ax = plots.new_figure()
    Ns = np.array(sorted(df["N"].unique()), float)
    for i, (R, g) in enumerate(df.groupby("R")):
        g = g.sort_values("N")
        c = plots.COLORS[i % 8]
        ax.plot(np.log2(g["N"]), g["dstar"], marker="o", color=c, label=f"R={R} trained d*")
        if alpha is not None:
            ax.plot(np.log2(Ns), alpha * R * np.log2(Ns) + beta, ls="--", color=c, lw=1)
        for b, ls in zip(bits, (":", "-.", (0, (1, 3)))):
            lb = [R * log2_factorial(int(n)) / (n * b) for n in Ns]
            ax.plot(np.log2(Ns), lb, ls=ls, color=c, lw=0.8, alpha=0.7,
                    label=f"bound b={b}" if i == 0 else None)
    ax.set(xlabel="log2 N", ylabel="d* (100% accuracy)",
           title="d* vs log2 N (dashed: fit; dotted: d >= R log2(N!)/(N b))")
    ax.legend(fontsize=7)
    return fig


@plots.figure("geo_e2_frozen_width")
def frozen_width(df: pd.DataFrame) -> plots.plt.Figure:
    """df: NR, mstar, regime."""
    fig, ax = plots.new_figure()
    _line_per_group(ax, df, "regime", "NR", "mstar")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set(xlabel="facts N*R", ylabel="MLP width m* (100% accuracy)")
    ax.legend()
    return fig


@plots.figure("geo_e3_probes")
def probes(df: pd.DataFrame) -> plots.plt.Figure:
    """df: label, r2_heldout, r2_shuffled, decoding, swap_success, swap_preservation (one row per model)."""
    cols = ["r2_heldout", "r2_shuffled", "decoding", "swap_success", "swap_preservation"]
    s = df.groupby("label")[cols].mean()
    fig, ax = plots.new_figure(figsize=(6.4, 3.6))
    x = np.arange(len(cols))
    w = 0.8 / max(len(s), 1)
    for i, (lab, row) in enumerate(s.iterrows()):
        ax.bar(x + i * w, row.values, w, label=lab, color=plots.COLORS[i % 8])
    ax.set_xticks(x + 0.4 - w / 2, [c.replace("_", "\n") for c in cols], fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("superposition probes")
    ax.legend(fontsize=7)
    return fig


@plots.figure("geo_e4_gating")
def gating(selectivity: list[float], ablation: list[list[float]], R: int) -> plots.plt.Figure:
    fig, (a1, a2) = plots.new_figure(ncols=2, figsize=(8, 3.4))
    a1.hist(selectivity, bins=20, range=(0, 1), color=plots.COLORS[0])
    a1.axvline(1 / R, color="k", ls="--", lw=1)
    a1.set_xlabel("unit selectivity max_r P / sum_r P")
    a1.set_ylabel("units")
    im = a2.imshow(np.array(ablation), vmin=0, vmax=1, cmap="viridis")
    a2.set_xlabel("relation evaluated")
    a2.set_ylabel("relation ablated")
    a2.grid(False)
    fig.colorbar(im, ax=a2, label="accuracy")
    return fig


@plots.figure("geo_e5_transfer")
def transfer(df: pd.DataFrame) -> plots.plt.Figure:
    """df: knob, T1_* methods, random, other_seed (means over seeds)."""
    cols = [c for c in ("T1_regress", "T1_regress_cv", "T1_inverse", "random", "other_seed") if c in df]
    s = df.groupby("knob")[cols].mean()
    fig, ax = plots.new_figure(figsize=(6.8, 3.6))
    x = np.arange(len(s))
    w = 0.8 / len(cols)
    for i, c in enumerate(s.columns):
        ax.bar(x + i * w, s[c].values, w, label=c, color=plots.COLORS[i])
    ax.set_xticks(x + 0.4 - w / 2, s.index, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("zero-shot accuracy on fresh bijections")
    ax.legend(fontsize=7)
    return fig


@plots.figure("geo_e6_multihop")
def multihop(df: pd.DataFrame) -> plots.plt.Figure:
    """df: k, cot, R, dstar."""
    fig, ax = plots.new_figure()
    for i, ((R, cot), g) in enumerate(df.groupby(["R", "cot"])):
        g = g.sort_values("k")
        ax.plot(g["k"], g["dstar"], marker="o", ls="-" if cot else "--", color=plots.COLORS[i % 8],
                label=f"R={R} {'CoT' if cot else 'no CoT'}")
    ax.set(xlabel="hops k", ylabel="d* (100% chains)", title="multi-hop: d* vs k")
    ax.legend()
    return fig
