"""LCA theory: the value matrix as an associative memory, its baselines, and reference decoders.

Notation: U [V, d] holds the tied embeddings u_z of the V = 2^m real tokens (row = token id).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import subspace_angles
from torch import Tensor

from ..tasks.lca import LCATask, counts, hamming, latent_bits


def hypercube_adjacency(m: int) -> Tensor:
    """[V, V] float 0/1 matrix, 1 where D_H(z, z') = 1."""
    return (hamming(m) == 1).float()


def constructed_W_V(U: Tensor) -> Tensor:
    """W_V^con = sum_z u_z (sum_i u_{z xor e_i})^T = U^T A U.  U [..., V, d] -> [..., d, d]."""
    m = int(math.log2(U.shape[-2]))
    A = hypercube_adjacency(m).to(U.dtype)
    return U.transpose(-1, -2) @ (A @ U)


def random_construction_W_V(U: Tensor, generator: torch.Generator) -> Tensor:
    """W_V^rand = sum_z u_z (sum_{i<=m} u_{r_{z,i}})^T with r_{z,i} iid uniform real tokens."""
    V = U.shape[-2]
    m = int(math.log2(V))
    r = torch.randint(V, (*U.shape[:-2], V, m), generator=generator)
    R = counts(r, V).to(U.dtype)                                   # [..., V, V] draws per (z, token)
    return U.transpose(-1, -2) @ (R @ U)


def gaussian_W_V(d: int, generator: torch.Generator, S: int | None = None) -> Tensor:
    """d x d i.i.d. N(0, 1) baseline (with a leading S if given)."""
    shape = (d, d) if S is None else (S, d, d)
    return torch.randn(*shape, generator=generator)


def smallest_principal_angle(W_a: Tensor, W_b: Tensor, rank: int) -> float:
    """Smallest principal angle (degrees) between the row spaces of the rank-``rank`` truncated
    SVDs of two d x d matrices (rows of the truncation span the top right-singular vectors)."""
    def row_basis(W: Tensor) -> np.ndarray:
        _, _, Vh = torch.linalg.svd(W.double())
        return Vh[:rank].T.numpy()                                    # [d, rank]
    return float(np.degrees(subspace_angles(row_basis(W_a), row_basis(W_b)).min()))


# --- reference decoders (no training) -------------------------------------------------------
def bayes_logposterior(x: Tensor, task: LCATask) -> Tensor:
    """Exact log P(t | x) up to a constant, uniform prior over targets. x [B, L] -> [B, V]:
    sum_{l<L} log pi_t(x_l) + log p(x_L | t)."""
    V = task.V
    log_pi = torch.log(task.rho * task.p + (1 - task.rho) / V)      # [t, z]
    log_p = torch.log(task.p)                                        # -inf off the neighbourhood
    c = counts(x[:, :-1], V).double()                                # [B, V]
    return c @ log_pi.T + log_p.T[x[:, -1]]


def bayes_predict(x: Tensor, task: LCATask) -> Tensor:
    return bayes_logposterior(x, task).argmax(-1)


def constructed_orthonormal_predict(x: Tensor, m: int) -> Tensor:
    """W_V^con with orthonormal embeddings and uniform attention: logit_k = #{l: D_H(x_l, k) = 1}
    (the unknown token scores 0). x [B, L] -> predicted ids [B] (first index on ties)."""
    c = counts(x, 2 ** m)
    return (c @ hypercube_adjacency(m)).argmax(-1)


def identity_orthonormal_predict(x: Tensor, m: int) -> Tensor:
    """Identity W_V with orthonormal embeddings: logit_k = count of k in the context."""
    return counts(x, 2 ** m).argmax(-1)


def majority_predict(x: Tensor, m: int) -> Tensor:
    """Canonical low-rank embeddings u_z = [c; 2z-1], identity W_V, uniform attention:
    logit_k = <2 z_k - 1, mean_l (2 x_l - 1)>, a bitwise majority vote (first index on ties)."""
    signs = 2.0 * latent_bits(m).float() - 1                          # [V, m]
    mean = signs[x].mean(1)                                           # [B, m]
    return (mean @ signs.T).argmax(-1)


def decoder_accuracy(decoder: str, task: LCATask, n: int, generator: torch.Generator,
                     chunk: int = 4096) -> float:
    """Accuracy of a reference decoder (bayes | constructed | identity | majority) on n fresh sequences."""
    fns = {
        "bayes": lambda x: bayes_predict(x, task),
        "constructed": lambda x: constructed_orthonormal_predict(x, task.m),
        "identity": lambda x: identity_orthonormal_predict(x, task.m),
        "majority": lambda x: majority_predict(x, task.m),
    }
    if decoder not in fns:
        raise ValueError(f"decoder: {decoder!r} is not allowed (allowed: {', '.join(fns)})")
    hits, done = 0, 0
    while done < n:
        b = min(chunk, n - done)
        x, t = task.sample(b, generator)
        hits += int((fns[decoder](x) == t).sum())
        done += b
    return hits / n
