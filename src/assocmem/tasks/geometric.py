"""Geometric factual recall task: R relations, each a seeded random bijection S -> A (spec geometric.md).

Entities S = {0..N-1}. By default the attribute set A *is* the entity set (shared by all relations, so
answers can be fed back as subjects for multi-hop chains). Relation r is a bijection f_r: S -> A drawn
as an independent uniform permutation from the ``task`` generator. The dataset enumerates every fact
(memorisation: there are no held-out facts).

Vocabulary (input tokens)::

    0 .. N-1          entity tokens (subjects; also answers fed back in CoT chains)
    N .. N+R-1        relation tokens
    N+R               PAD
    N+R+1             BOS   (present in the vocabulary, unused by the default formats)
    N+R+2             QUERY (last token of the noise format)
    N+R+3 ..          noise tokens (``n_noise`` of them)

The output head scores only answers: the N entities, or R*N attribute ids when ``disjoint`` (relation r
owns answers r*N .. r*N+N-1; [ours], the App. F theme).

Formats (all [ours], reconstructed):

* single hop ``sr``: ``[s, r]`` with target f_r(s) at the last position; ``rs``: ``[r, s]``.
* noise: ``T`` tokens; s and r at random distinct positions among noise tokens in 0..T-2, QUERY last.
* multi-hop slot format with K slots: positions 0..K-1 hold r_1..r_k (PAD after k), position K holds s.
  No CoT: one target f_c(s) at position K. CoT (teacher forced): the inputs at K+1..K+k-1 are the
  intermediate answers a_1..a_{k-1}, targets a_1..a_k sit at positions K..K+k-1, so a_t is predicted
  where its relation r_t sits exactly K positions earlier.

Chains c = (r_1..r_k) compose as f_c = f_{r_k} o ... o f_{r_1}.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import Tensor

IGNORE = -1  # target value at positions without a loss


def draw_bijections(N: int, R: int, gen: torch.Generator) -> Tensor:
    """[R, N] long; row r is the permutation f_r (f_r(s) = bij[r, s]), drawn independently."""
    return torch.stack([torch.randperm(N, generator=gen) for _ in range(R)])


def log2_factorial(N: int) -> float:
    """log2(N!) computed exactly via lgamma."""
    return math.lgamma(N + 1) / math.log(2)


def information_bits(N: int, R: int) -> float:
    """Information content of the task: R * log2(N!) bits (R independent bijections)."""
    return R * log2_factorial(N)


def all_chains(R: int, k: int) -> Tensor:
    """[R^k, k] long; every chain (r_1..r_k) in lexicographic order."""
    return torch.tensor(list(itertools.product(range(R), repeat=k)), dtype=torch.long).reshape(-1, k)


def compose(bij: Tensor, chain: Tensor) -> Tensor:
    """Intermediate answers of one chain for all subjects: [k, N], row t-1 = a_t = f_{r_t}(a_{t-1})."""
    a = torch.arange(bij.shape[1])
    out = []
    for r in chain.tolist():
        a = bij[r, a]
        out.append(a)
    return torch.stack(out)


@dataclasses.dataclass(frozen=True)
class Vocab:
    N: int
    R: int
    n_noise: int = 0
    disjoint: bool = False

    @property
    def PAD(self) -> int:
        return self.N + self.R

    @property
    def BOS(self) -> int:
        return self.N + self.R + 1

    @property
    def QUERY(self) -> int:
        return self.N + self.R + 2

    def rel(self, r: int | Tensor) -> int | Tensor:
        return self.N + r

    @property
    def size(self) -> int:
        return self.N + self.R + 3 + self.n_noise

    @property
    def n_out(self) -> int:
        return self.N * self.R if self.disjoint else self.N


@dataclasses.dataclass
class GeoData:
    """One instance's dataset.

    tokens:  [B, T] long input tokens;   targets: [B, T] long, IGNORE where there is no loss
    subj:    [B] subject of each query;   chain: [B, k] relations of each query (k = 1 single hop)
    out_pos: (start, stop) positions that carry targets (the model only computes logits there)
    """
    tokens: Tensor
    targets: Tensor
    subj: Tensor
    chain: Tensor
    out_pos: tuple[int, int]
    vocab: Vocab
    bij: Tensor

    @property
    def n_queries(self) -> int:
        return self.tokens.shape[0]


def single_hop(bij: Tensor, order: str = "sr", disjoint: bool = False, n_noise: int = 0, T: int = 2,
               gen: torch.Generator | None = None) -> GeoData:
    """All N*R facts; row i = r*N + s. ``order`` in {sr, rs, noise} (noise needs ``gen``, ``T >= 3``)."""
    R, N = bij.shape
    voc = Vocab(N, R, n_noise if order == "noise" else 0, disjoint)
    s = torch.arange(N).repeat(R)
    r = torch.arange(R).repeat_interleave(N)
    ans = bij[r, s] + (r * N if disjoint else 0)
    if order == "sr":
        tokens = torch.stack([s, voc.rel(r)], 1)
    elif order == "rs":
        tokens = torch.stack([voc.rel(r), s], 1)
    elif order == "noise":
        if gen is None or T < 3 or n_noise < 1:
            raise ValueError("noise format needs gen, T >= 3 and n_noise >= 1")
        B = N * R
        tokens = (voc.N + voc.R + 3) + torch.randint(0, n_noise, (B, T), generator=gen)
        pos = torch.argsort(torch.rand(B, T - 1, generator=gen), dim=1)[:, :2]
        rows = torch.arange(B)
        tokens[rows, pos[:, 0]] = s
        tokens[rows, pos[:, 1]] = voc.rel(r)
        tokens[:, -1] = voc.QUERY
    else:
        raise ValueError(f"order: {order!r} is not allowed (allowed: sr, rs, noise)")
    T_ = tokens.shape[1]
    targets = torch.full_like(tokens, IGNORE)
    targets[:, -1] = ans
    return GeoData(tokens, targets, s, r[:, None], (T_ - 1, T_), voc, bij)


def multi_hop(bij: Tensor, k: int, K: int, cot: bool, chains: Tensor | None = None) -> GeoData:
    """All R^k * N chain queries of length k in the slot format with K >= k slots; row = c*N + s.

    ``chains`` [C, k] restricts the queries to a subset of chains (e.g. a sample when R^k is huge).
    """
    if not 1 <= k <= K:
        raise ValueError(f"k: {k} is not allowed (allowed: 1 <= k <= K={K})")
    R, N = bij.shape
    voc = Vocab(N, R)
    chains = all_chains(R, k) if chains is None else chains          # [C, k]
    C = chains.shape[0]
    inter = torch.stack([compose(bij, c) for c in chains])           # [C, k, N]
    s = torch.arange(N).repeat(C)
    ch = chains.repeat_interleave(N, 0)                              # [C*N, k]
    answers = inter.permute(0, 2, 1).reshape(C * N, k)               # [C*N, k]: a_1..a_k
    T = K + k if cot else K + 1
    tokens = torch.full((C * N, T), voc.PAD, dtype=torch.long)
    tokens[:, :k] = voc.rel(ch)
    tokens[:, K] = s
    targets = torch.full_like(tokens, IGNORE)
    if cot:
        tokens[:, K + 1:K + k] = answers[:, :k - 1]
        targets[:, K:K + k] = answers
        out = (K, K + k)
    else:
        targets[:, K] = answers[:, -1]
        out = (K, K + 1)
    return GeoData(tokens, targets, s, ch, out, voc, bij)
