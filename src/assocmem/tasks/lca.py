"""Latent concept association (LCA) task of Jiang et al. (NeurIPS 2024).

Latents z in {0,1}^m are tokens ``iota(z)`` read most-significant-bit first, ids 0..V-1 with
V = 2^m; id V is the "unknown" token that never occurs but has an embedding and a logit, so the
vocabulary has V+1 entries.

A sequence of length L for target t (uniform over all V latents):
  positions 1..L-1: with prob. rho a draw from p(.|t), else a uniform draw over all V latents;
  position L (the query): always a draw from p(.|t);
  label: t.
with p(z|t) proportional to exp(-D_H(z,t)/beta) on the neighbourhood N(t):
  standard: N(t) = Z minus {t};   cluster c: {z != t sharing t's first c bits}.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


def latent_bits(m: int) -> Tensor:
    """[V, m] 0/1 matrix; row i holds the bits of token i, MSB first (column 0 = z_1)."""
    ids = torch.arange(2 ** m)
    shifts = torch.arange(m - 1, -1, -1)
    return (ids[:, None] >> shifts) & 1


def hamming(m: int) -> Tensor:
    """[V, V] Hamming distances D_H between all latents (popcount of XOR of ids)."""
    b = latent_bits(m)
    return (b[:, None, :] != b[None, :, :]).sum(-1)


def context_table(m: int, beta: float = 1.0, cluster: int = 0) -> Tensor:
    """[V, V] float64 table p(z | t) (row t), zero outside N(t) and on the diagonal."""
    D = hamming(m).double()
    w = torch.exp(-D / beta)
    w.fill_diagonal_(0.0)
    if cluster:
        prefix = torch.arange(2 ** m) >> (m - cluster)
        w = w * (prefix[:, None] == prefix[None, :])
    return w / w.sum(1, keepdim=True)


def mixture_table(m: int, beta: float = 1.0, cluster: int = 0, rho: float = 0.5) -> Tensor:
    """[V, V] per-position marginal pi_t = rho p(.|t) + (1-rho)/V of positions 1..L-1."""
    return rho * context_table(m, beta, cluster) + (1.0 - rho) / 2 ** m


class LCATask:
    """Vectorised sampler for one (m, L, beta, rho, c) setting. Tables are built once."""

    def __init__(self, m: int, L: int, beta: float = 1.0, rho: float = 0.5, cluster: int = 0):
        if not 0 <= cluster < m:
            raise ValueError(f"cluster: {cluster} is not allowed (allowed: 0 <= c < m={m})")
        self.m, self.L, self.beta, self.rho, self.cluster = m, L, beta, rho, cluster
        self.V = 2 ** m
        self.vocab_size = self.V + 1
        self.unknown = self.V
        self.p = context_table(m, beta, cluster)            # float64 [V, V]
        # p(z|t) depends on z only through the flip pattern e = z xor t, whose law q(e) = p(e|0) is the
        # same for every t (standard and cluster variants alike), and a uniform noise token is t xor a
        # uniform pattern. So every position is x = t xor (j mod V) with j from one alias table over
        # 2V outcomes: j < V informative flip j (prob rho q(j)), j >= V noise flip j-V (prob (1-rho)/V).
        # The last position uses the same layout with law q (no noise).
        V = self.V
        q = self.p[0]
        ctx = torch.cat([rho * q, torch.full((V,), (1.0 - rho) / V, dtype=torch.float64)])
        last = torch.cat([q, torch.zeros(V, dtype=torch.float64)])
        tables = [alias_table(ctx), alias_table(last)]
        self.alias_prob = torch.cat([tables[0][0], tables[1][0]])           # [4V] float64
        # alias outcomes carry their table's offset (0 or 2V, multiples of V), so j mod V is the flip
        # pattern and bit V of j marks noise for both tables
        self.alias = torch.cat([tables[0][1], tables[1][1] + 2 * V])        # [4V] long
        self.offset = torch.zeros(L, dtype=torch.long)
        self.offset[-1] = 2 * V

    def draw(self, batch: int, generator: torch.Generator,
             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """All randomness of ``batch`` sequences: targets t [batch] and uniforms u [batch, L]
        (float64), optionally written into preallocated ``out`` tensors."""
        t, u = out if out is not None else (torch.empty(batch, dtype=torch.long),
                                            torch.empty(batch, self.L, dtype=torch.float64))
        torch.randint(self.V, (batch,), generator=generator, out=t)
        torch.rand(batch, self.L, generator=generator, dtype=torch.float64, out=u)
        return t, u

    def decode(self, t: Tensor, u: Tensor, return_noise: bool = False):
        """Turn draws into tokens, exactly (alias method); any leading dims: t [...], u [..., L].

        Per position: w = 2V u, column k = floor(w) (+ table offset for the last position), outcome
        j = k if frac(w) < prob[k] else alias[k]; token x = t xor (j mod V); noise = j >= V.

        Returns x [..., L] long and, if ``return_noise``, noise [..., L-1] (True where position l < L
        was a uniform noise draw).
        """
        V = self.V
        w = u * (2 * V)
        k = w.long()
        frac = w.sub_(k)
        idx = k.add_(self.offset).view(-1)                                  # column, table offset included
        keep = frac < self.alias_prob.index_select(0, idx).view(frac.shape)
        j = torch.where(keep, k, self.alias.index_select(0, idx).view(k.shape))
        noise = (j[..., :-1] & V) != 0 if return_noise else None
        x = j.bitwise_and_(V - 1).bitwise_xor_(t[..., None])
        return (x, noise) if return_noise else x

    def sample(self, batch: int, generator: torch.Generator, return_noise: bool = False):
        """Draw ``batch`` sequences: x [batch, L] long, t [batch] long (and the noise mask)."""
        t, u = self.draw(batch, generator)
        out = self.decode(t, u, return_noise)
        return (out[0], t, out[1]) if return_noise else (out, t)


def alias_table(q: Tensor) -> tuple[Tensor, Tensor]:
    """Walker/Vose alias table of a discrete law q [V] (float64): (prob [V] float64, alias [V] long).
    Drawing k uniform and keeping k with probability prob[k] (else alias[k]) samples exactly q."""
    V = q.numel()
    scaled = (q / q.sum() * V).tolist()
    prob, alias = [1.0] * V, list(range(V))
    small = [i for i, s in enumerate(scaled) if s < 1.0]
    large = [i for i, s in enumerate(scaled) if s >= 1.0]
    while small and large:
        s, l_ = small.pop(), large.pop()
        prob[s], alias[s] = scaled[s], l_
        scaled[l_] -= 1.0 - scaled[s]
        (small if scaled[l_] < 1.0 else large).append(l_)
    for i in small + large:      # leftovers are 1 up to rounding
        prob[i] = 1.0
    return torch.tensor(prob, dtype=torch.float64), torch.tensor(alias, dtype=torch.long)


def counts(x: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Token counts over the last dim: x [..., L] long -> [..., vocab_size] (scatter_add, no one-hot)."""
    out = torch.zeros(*x.shape[:-1], vocab_size, dtype=dtype, device=x.device)
    return out.scatter_add_(-1, x, torch.ones(x.shape, dtype=dtype, device=x.device))


def mix(x_a: Tensor, x_b: Tensor, r: float, generator: torch.Generator) -> Tensor:
    """Synthetic hijacking: each position (the last included) takes B's token with probability r."""
    take_b = torch.rand(x_a.shape, generator=generator) < r
    return torch.where(take_b, x_b, x_a)


@functools.lru_cache(maxsize=32)
def task_for(m: int, L: int, beta: float, rho: float, cluster: int) -> LCATask:
    return LCATask(m, L, beta, rho, cluster)
