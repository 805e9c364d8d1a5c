"""Analyses of trained LCA models (Jiang et al. 2024), each a library function that works on a stacked
:class:`~assocmem.models.lca.LCAModel` (leading instance dimension S) or on plain tensors, so it can be
tested on a hand-built model with a known answer.

Evaluation data always comes from explicit generators (the runs' ``eval`` seed streams); every
function returns per-instance values and leaves averaging (mean, sem over seeds) to :func:`mean_sem`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..models.lca import LCAModel
from ..runners.lca import accuracy_and_loss, sample_stack
from ..tasks.lca import LCATask, hamming, mix
from ..theory.lca import (constructed_W_V, decoder_accuracy, gaussian_W_V, random_construction_W_V,
                          smallest_principal_angle)


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof=1; sem 0 for a single value)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0


def summarize(df: pd.DataFrame, by: Sequence[str], value: str = "accuracy") -> pd.DataFrame:
    """Group ``df`` by ``by`` and return columns ``by + [mean, sem, n]`` (sem over the rows = seeds)."""
    rows = []
    for key, g in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        mu, se = mean_sem(g[value])
        rows.append({**dict(zip(by, key)), "mean": mu, "sem": se, "n": int(g[value].notna().sum())})
    return pd.DataFrame(rows, columns=[*by, "mean", "sem", "n"])


def real_embeddings(model: LCAModel) -> Tensor:
    """[S, V, d] tied embeddings of the 2^m real tokens (the unknown token, last row, dropped)."""
    return model.W_E.detach()[:, :-1]


# --- embedding geometry ----------------------------------------------------------------------
def hamming_inner(U: Tensor) -> Tensor:
    """Mean <u_z, u_z'> by Hamming distance over pairs with id(z) >= id(z') (distance 0 = squared norms).

    U [S, V, d] (or [V, d]) real-token embeddings -> [S, m+1] (or [m+1])."""
    squeeze = U.dim() == 2
    U = U[None] if squeeze else U
    V = U.shape[1]
    m = int(round(math.log2(V)))
    D = hamming(m)
    lower = torch.tril(torch.ones(V, V, dtype=torch.bool))
    G = U.double() @ U.double().transpose(1, 2)
    out = torch.stack([G[:, (D == k) & lower].mean(1) for k in range(m + 1)], 1)
    return out[0] if squeeze else out


def spectrum(W_E: Tensor) -> Tensor:
    """Singular values of the full (2^m+1) x d embedding matrix: [S, min(V+1, d)] (or unstacked)."""
    return torch.linalg.svdvals(W_E.detach().double())


# --- attention ---------------------------------------------------------------------------------
def attention_heat_map(model: LCAModel) -> Tensor:
    """[V, V] seed-averaged attention over all real-token pairs (rows = queries, sum to 1)."""
    V = model.vocab_size - 1
    return model.attention_map(V).detach().mean(0)


def block_contrast(A: Tensor, c: int) -> float:
    """Mean attention inside the 2^c diagonal blocks of size V/2^c divided by the mean outside."""
    V = A.shape[-1]
    block = torch.arange(V) >> (int(round(math.log2(V))) - c)
    inside = block[:, None] == block[None, :]
    return float(A[inside].mean() / A[~inside].mean())


# --- W_V replacement and principal angles -------------------------------------------------------
def baseline_W_V(model: LCAModel, kind: str, generator: torch.Generator) -> Tensor:
    """[S, d, d] W_V built from each instance's own real-token embeddings: ``constructed`` (W_V^con),
    ``random`` (random construction) or ``gaussian`` (i.i.d. N(0,1))."""
    U = real_embeddings(model)
    if kind == "constructed":
        return constructed_W_V(U)
    if kind == "random":
        return random_construction_W_V(U, generator)
    if kind == "gaussian":
        return gaussian_W_V(model.d_model, generator, model.S)
    raise ValueError(f"kind: {kind!r} is not allowed (allowed: constructed, random, gaussian)")


def with_W_V(model: LCAModel, W_V: Tensor) -> LCAModel:
    """A copy of ``model`` whose value matrix is replaced (no retraining)."""
    return LCAModel(model.W_E.detach().clone(), model.W_Q.detach().clone(), model.W_K.detach().clone(),
                    W_V.detach().clone().to(model.W_E.dtype), train_embeddings=False,
                    uniform_attention=model.uniform_attention)


def replaced_accuracy(model: LCAModel, task: LCATask, kind: str, eval_generators: list[torch.Generator],
                      n: int, generator: torch.Generator) -> Tensor:
    """[S] accuracy after replacing W_V by the ``kind`` baseline built from the model's embeddings."""
    return accuracy_and_loss(with_W_V(model, baseline_W_V(model, kind, generator)), task, eval_generators, n)[0]


def principal_angles(model: LCAModel, rank: int, generator: torch.Generator,
                     kinds: Sequence[str] = ("constructed", "random", "gaussian")) -> dict[str, list[float]]:
    """Smallest principal angle (degrees) between the rank-``rank`` truncations of each baseline and of
    the trained W_V, per instance: {kind: [S]}."""
    if model.W_V is None:
        raise ValueError("model: identity W_V has no value matrix to compare")
    W = model.W_V.detach()
    out = {}
    for kind in kinds:
        B = baseline_W_V(model, kind, generator)
        out[kind] = [smallest_principal_angle(W[s], B[s], rank) for s in range(model.S)]
    return out


# --- synthetic hijacking -------------------------------------------------------------------------
@torch.no_grad()
def mixing_accuracy(model: LCAModel, task: LCATask, rates: Sequence[float], eval_generators: list[torch.Generator],
                    n: int = 1024, generator: torch.Generator | None = None) -> pd.DataFrame:
    """Mix two independent batches A, B at rate r (each position takes B's token with prob. r) and
    score against A's target ("Target True") and B's ("Target False").

    Returns one row per (instance, r): columns ``instance, r, target_true, target_false``."""
    generator = generator or torch.Generator().manual_seed(0)
    x_a, t_a = sample_stack(task, n, eval_generators)
    x_b, t_b = sample_stack(task, n, eval_generators)
    rows = []
    for r in rates:
        pred = model(mix(x_a, x_b, float(r), generator)).argmax(-1)
        true, false = (pred == t_a).float().mean(1), (pred == t_b).float().mean(1)
        rows += [{"instance": s, "r": float(r), "target_true": float(true[s]), "target_false": float(false[s])}
                 for s in range(model.S)]
    return pd.DataFrame(rows)


def crossing_rate(r: Sequence[float], true: Sequence[float], false: Sequence[float]) -> float:
    """Mixing rate where the Target True and Target False curves cross (linear interpolation)."""
    r, diff = np.asarray(r, float), np.asarray(true, float) - np.asarray(false, float)
    for i in range(len(r) - 1):
        if diff[i] >= 0 >= diff[i + 1] and diff[i] != diff[i + 1]:
            return float(r[i] + (r[i + 1] - r[i]) * diff[i] / (diff[i] - diff[i + 1]))
    return math.nan


# --- context length and references ----------------------------------------------------------------
def best_lr(df: pd.DataFrame, by: Sequence[str] = ("task.m", "model.d_model", "task.L"),
            lr: str = "optim.lr", value: str = "accuracy") -> pd.DataFrame:
    """Keep, per ``by`` group, the rows of the learning rate with the higher mean ``value`` over seeds."""
    keep = []
    for _, g in df.groupby(list(by), sort=True):
        means = g.groupby(lr)[value].mean()
        keep.append(g[g[lr] == means.idxmax()])
    return pd.concat(keep) if keep else df.iloc[:0]


def bayes_ceiling(m: int, L: int, n: int = 4096, seed: int = 12345) -> float:
    """Accuracy of the exact Bayes posterior decoder for the standard task at (m, L)."""
    from ..tasks.lca import task_for
    return decoder_accuracy("bayes", task_for(m, L, 1.0, 0.5, 0), n, torch.Generator().manual_seed(seed))


def is_monotone(values: Sequence[float], increasing: bool = True, slack: float = 0.0) -> bool:
    """True when consecutive values never move against the direction by more than ``slack``."""
    v = np.asarray(values, float)
    d = np.diff(v) if increasing else -np.diff(v)
    return bool((d >= -slack).all())
