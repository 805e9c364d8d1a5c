"""Figures for the induction-head reproduction. Each function takes a DataFrame (or arrays) and
returns a matplotlib Figure; :mod:`assocmem.experiments.induction` saves them with ``plots.save``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plots import COLORS, STYLE, figure


def _subplots(n: int, m: int = 1, w: float = 4.2, h: float = 3.2):
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(m, n, figsize=(w * n, h * m), squeeze=False)
    return fig, axes


@figure("birth_fig3_probes")
def probe_curves(df: pd.DataFrame, variants: pd.DataFrame, authors: pd.DataFrame | None = None) -> plt.Figure:
    """df: step, metric, value (main run); variants: step, variant, acc_end (freeze variants);
    authors: step, metric, value, the authors' code's numbers (points in the colour of our metric)."""
    fig, ax = _subplots(2)
    color = {}
    for i, (name, g) in enumerate(df.groupby("metric", sort=False)):
        color[name] = COLORS[i % len(COLORS)]
        ax[0, 0].plot(g["step"], g["value"], label=name, color=color[name])
    if authors is not None and len(authors):
        ax[0, 0].scatter(authors["step"], authors["value"], c=[color.get(m, "black") for m in authors["metric"]],
                         marker="o", s=28, edgecolors="black", zorder=3, label="authors' code (README config)")
    ax[0, 0].set(xlabel="iteration", ylabel="probe / accuracy", title="memory-recall probes (README config)")
    ax[0, 0].legend()
    for i, (name, g) in enumerate(variants.groupby("variant", sort=False)):
        ax[0, 1].plot(g["step"], g["acc_end"], label=name, color=COLORS[i % len(COLORS)])
    ax[0, 1].set(xlabel="iteration", ylabel="in-context accuracy (test)", title="freeze until step F")
    ax[0, 1].legend()
    return fig


@figure("birth_fig4_data")
def data_curves(df: pd.DataFrame, metrics=("loss_bigram", "loss_head", "acc_end", "acc_end_test", "ff1")) -> plt.Figure:
    """df: step, variant, metric, value."""
    fig, ax = _subplots(len(metrics), w=3.4)
    for j, met in enumerate(metrics):
        sub = df[df["metric"] == met]
        for i, (name, g) in enumerate(sub.groupby("variant", sort=False)):
            ax[0, j].plot(g["step"], g["value"], label=name, color=COLORS[i % len(COLORS)], lw=1.2)
        ax[0, j].set(xlabel="iteration", title=met)
    ax[0, 0].legend(fontsize=7)
    return fig


@figure("birth_fig2_attention")
def attention_maps(maps: list[tuple[str, np.ndarray, np.ndarray, list[str], list[int]]]) -> plt.Figure:
    """maps: (title, attn1 [n,n], attn2 [n,n], token labels, marked positions)."""
    fig, ax = _subplots(2, len(maps), w=4.0, h=3.8)
    for r, (title, a1, a2, labels, marks) in enumerate(maps):
        for c, (a, name) in enumerate(((a1, "layer 1"), (a2, "layer 2"))):
            axx = ax[r, c]
            axx.imshow(a, cmap="Blues", vmin=0, vmax=max(float(a.max()), 1e-6))
            axx.set_title(f"{title}: {name}", fontsize=9)
            axx.set_xticks(range(len(labels)))
            axx.set_xticklabels(labels, fontsize=6)
            axx.set_yticks(range(len(labels)))
            axx.set_yticklabels(labels, fontsize=6)
            axx.grid(False)
            for mpos in marks:
                axx.get_xticklabels()[mpos].set_color("red")
                axx.get_yticklabels()[mpos].set_color("red")
    return fig


@figure("ws_length_buckets")
def bucket_curves(df: pd.DataFrame) -> plt.Figure:
    """df: model, T_test, bucket_start, acc, prev (per position bucket)."""
    fig, ax = _subplots(2)
    for i, ((model, T), g) in enumerate(df.groupby(["model", "T_test"], sort=False)):
        kw = dict(color=COLORS[i % len(COLORS)], label=f"{model} T={T}", marker="o", ms=3)
        ax[0, 0].plot(g["bucket_start"], g["acc"], **kw)
        ax[0, 1].plot(g["bucket_start"], g["prev"], **kw)
    for a in ax[0]:
        a.axvline(df["T_train"].iloc[0], color="k", ls=":", lw=1)
    ax[0, 0].set(xlabel="position bucket start", ylabel="in-context accuracy", title="pairs only beyond T_train")
    ax[0, 1].set(xlabel="position bucket start", ylabel="layer-1 previous-token acc.")
    ax[0, 0].legend(fontsize=7)
    return fig


def _by_model(df: pd.DataFrame):
    """(model, its rows, its colour) in order of first appearance."""
    for i, (model, g) in enumerate(df.groupby("model", sort=False)):
        yield model, g, COLORS[i % len(COLORS)]


def _line_per_model(df: pd.DataFrame, x: str, y: str, **labels) -> plt.Figure:
    """One line per model of y against x; ``labels`` go to ``Axes.set`` (xlabel, ylabel, title)."""
    fig, ax = _subplots(1)
    a = ax[0, 0]
    for model, g, c in _by_model(df):
        a.plot(g[x], g[y], marker="o", label=model, color=c)
    a.set(**labels)
    a.legend(fontsize=8)
    return fig


@figure("ws_delay")
def delay_curves(df: pd.DataFrame) -> plt.Figure:
    """df: model, L0, acc_end."""
    return _line_per_model(df, "L0", "acc_end", xlabel="delay L0 (tokens without triggers)",
                           ylabel="in-context accuracy")


def _model_and_rule(ax: plt.Axes, x, model_y, rule_y, color: str, label: str) -> None:
    """A trained model's curve (solid, markers) and the closed-form rule's (dashed) in one colour."""
    ax.plot(x, model_y, marker="o", color=color, label=label)
    ax.plot(x, rule_y, ls="--", color=color, lw=1)


@figure("ws_hijack_fraction")
def hijack_fraction(df: pd.DataFrame) -> plt.Figure:
    """df rows (single + conflict prompts): model, frac_o, model_o_wins, rule_o_wins, gap_model, gap_rule."""
    fig, ax = _subplots(2)
    for model, g, c in _by_model(df):
        agg = g.groupby("frac_o").agg(win=("model_o_wins", "mean"), rule=("rule_o_wins", "mean"),
                                     gap=("gap_model", "mean"), gap_rule=("gap_rule", "mean")).reset_index()
        _model_and_rule(ax[0, 0], agg["frac_o"], agg["win"], agg["rule"], c, model)
        _model_and_rule(ax[0, 1], agg["frac_o"], agg["gap"], agg["gap_rule"], c, model)
    ax[0, 0].set(xlabel="n_o / |S|", ylabel="in-context win rate", title="solid: model, dashed: closed form")
    ax[0, 1].set(xlabel="n_o / |S|", ylabel="logit gap xi(o) - xi(b)")
    ax[0, 0].legend(fontsize=7)
    return fig


@figure("ws_hijack_logprob")
def hijack_logprob(df: pd.DataFrame) -> plt.Figure:
    """df rows (single family): model, log_pi_o, model_o_wins, rule_o_wins."""
    fig, ax = _subplots(1)
    for model, g, c in _by_model(df):
        agg = g.groupby("log_pi_o").agg(win=("model_o_wins", "mean"), rule=("rule_o_wins", "mean")).reset_index()
        _model_and_rule(ax[0, 0], agg["log_pi_o"], agg["win"], agg["rule"], c, model)
    ax[0, 0].set(xlabel="log pi_b(o | q)", ylabel="in-context win rate", title="solid: model, dashed: closed form")
    ax[0, 0].legend(fontsize=7)
    return fig


@figure("ws_hijack_conflict")
def hijack_conflict(df: pd.DataFrame) -> plt.Figure:
    """df rows (conflict family): model, cell, model_o_wins, model_o2_wins, model_b_wins."""
    models = list(dict.fromkeys(df["model"]))
    fig, ax = _subplots(len(models), w=3.4)
    for j, model in enumerate(models):
        g = df[df["model"] == model].groupby("cell", sort=False)[["model_o_wins", "model_o2_wins", "model_b_wins"]].mean()
        x = np.arange(len(g))
        for k, (col, lab) in enumerate((("model_o_wins", "o1"), ("model_o2_wins", "o2"), ("model_b_wins", "global b"))):
            ax[0, j].bar(x + 0.27 * (k - 1), g[col], width=0.27, label=lab, color=COLORS[k])
        ax[0, j].set_xticks(x)
        ax[0, j].set_xticklabels(g.index, fontsize=8)
        ax[0, j].set(title=model, xlabel="(n1, n2)", ylabel="share of top-1")
    ax[0, 0].legend(fontsize=7)
    return fig


@figure("ws_hijack_distance")
def hijack_distance(df: pd.DataFrame) -> plt.Figure:
    """df rows (distance family): model, x (distance to the end), start, model_o_wins."""
    fig, ax = _subplots(1)
    for i, (model, g) in enumerate(df.groupby("model", sort=False)):
        agg = g.groupby("start")["model_o_wins"].mean().reset_index()
        ax[0, 0].plot(agg["start"], agg["model_o_wins"], marker="o", label=model, color=COLORS[i % len(COLORS)])
    if "T_train" in df:
        ax[0, 0].axvline(df["T_train"].iloc[0], color="k", ls=":", lw=1)
    ax[0, 0].set(xlabel="position of the earlier occurrences", ylabel="in-context win rate")
    ax[0, 0].legend(fontsize=7)
    return fig


@figure("ws_lambda_n")
def lambda_by_count(df: pd.DataFrame) -> plt.Figure:
    """df: model, n, lambda (the count-dependent rule's in-context weight, fitted per trained model)."""
    return _line_per_model(df, "n", "lambda", xlabel="in-context count n_k of the successor",
                           ylabel="fitted lambda(n)", title="xi(k) = lambda(n_k) + mu log pi_b(k|q)")
