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
import math
from collections.abc import Callable, Sequence

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
        self.cells = CellTable([alias_table(ctx), alias_table(last)])
        self.table_of_position = torch.zeros(L, dtype=torch.long)  # 0: context table, 1: last token
        self.table_of_position[-1] = 1

    def draw(self, batch: int, generator: torch.Generator,
             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The fixed-size randomness of ``batch`` sequences: targets t [batch] and the cell of every
        position k [batch, L] (uniform on the alias cells, see :class:`CellTable`), optionally written
        into preallocated ``out`` tensors. :meth:`decode` draws the few extra fraction bits it needs."""
        t, k = out if out is not None else (torch.empty(batch, dtype=torch.long),
                                            torch.empty(batch, self.L, dtype=torch.long))
        torch.randint(self.V, (batch,), generator=generator, out=t)
        self.cells.draw(k, generator)
        return t, k

    def decode(self, t: Tensor, k: Tensor, generators: torch.Generator | Sequence[torch.Generator],
               return_noise: bool = False):
        """Turn draws into tokens, exactly (alias method): t [...], k [..., L] from :meth:`draw`.

        Position l < L draws outcome j from the context table, position L from the last-token table;
        token x = t xor (j mod V); noise = j >= V. Draws in a straddling cell take their fraction bits
        from ``generators``: one generator, or a list with one per index of the leading dim (a stack of
        instances, each with its own stream, exactly as if decoded one at a time).

        Returns x [..., L] long and, if ``return_noise``, noise [..., L-1] (True where position l < L
        was a uniform noise draw).
        """
        V = self.V
        low = fraction_bits(generators, k.numel(), self.cells.low_bits)
        j = self.cells.sample(k, low, self.table_of_position, None if return_noise else V - 1)
        if not return_noise:
            return j.bitwise_xor_(t[..., None])
        noise = (j[..., :-1] & V) != 0
        return j.bitwise_and_(V - 1).bitwise_xor_(t[..., None]), noise

    def sample(self, batch: int, generator: torch.Generator, return_noise: bool = False):
        """Draw ``batch`` sequences: x [batch, L] long, t [batch] long (and the noise mask)."""
        t, k = self.draw(batch, generator)
        out = self.decode(t, k, generator, return_noise)
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


class CellTable:
    """Alias tables sampled with one table lookup per draw, exactly.

    For an alias table over C = 2^b columns (prob, alias), a uniform U in [0, C) picks column
    floor(U) and the draw is that column if frac(U) < prob[col], else alias[col]. Here U is generated
    in two parts: a uniform cell k of 2^index_bits equal cells (2^(index_bits - b) per column) and,
    only when needed, 63 - index_bits further fraction bits. A cell lying wholly below or above its
    column's threshold theta = ceil(prob 2^(63-b)) has a fixed outcome (``fixed``); at most one cell
    per column straddles theta (``fixed`` = -1), and only draws landing there (at most a fraction
    C / 2^15: 1/256 at m = 6, 1/16 at m = 10) draw their low bits and compare them with the residual threshold in exact integer arithmetic.
    The law is the float64 table's law up to a resolution of 2^-63 in U / C. Several tables of equal
    size stack; table i occupies cells [i 2^index_bits, (i+1) 2^index_bits).
    """

    def __init__(self, tables: list[tuple[Tensor, Tensor]]):
        C = tables[0][0].numel()
        b = C.bit_length() - 1
        assert C == 2 ** b and all(p.numel() == C for p, _ in tables), "columns must be a power of two"
        assert b <= 11, "at most 2^11 columns (m <= 10)"
        self.index_bits = 15                               # cells per column >= 16; see draw()
        self.low_bits = 63 - self.index_bits
        sub = self.index_bits - b                          # cells per column = 2^sub
        cell = torch.arange(2 ** self.index_bits)
        col, i = cell >> sub, cell & (2 ** sub - 1)
        fixed, keep_id, alias_id, residual = [], [], [], []
        for prob, alias in tables:
            theta = torch.tensor([math.ceil(v * 2.0 ** (63 - b)) for v in prob.tolist()], dtype=torch.long)
            lo, hi = i << self.low_bits, (i + 1) << self.low_bits   # the cell's fraction range [lo, hi)
            th = theta[col]
            f = torch.where(hi <= th, col, alias[col])
            fixed.append(torch.where((lo < th) & (th < hi), -1, f))
            keep_id.append(col)
            alias_id.append(alias[col])
            residual.append(th - lo)
        self.fixed = torch.cat(fixed)
        self.keep_id, self.alias_id, self.residual = torch.cat(keep_id), torch.cat(alias_id), torch.cat(residual)

    def draw(self, out: Tensor, generator: torch.Generator) -> Tensor:
        """Fill ``out`` (contiguous int64) with uniform cells of table 0. One 63-bit random word
        (bits 0..62 uniform) viewed as four 16-bit fields gives four independent 15-bit cells
        (each field's top bit dropped), so one generator call serves four draws."""
        n = out.numel()
        words = torch.empty(-(-n // 4), dtype=torch.long).random_(generator=generator)   # [0, 2^63)
        fields = words.view(torch.int16)[:n]
        return out.view(-1).copy_(torch.bitwise_and(fields, 2 ** 15 - 1)).view(out.shape)

    def sample(self, k: Tensor, low: Callable[[Tensor], Tensor], table_of_position: Tensor | None = None,
               mask: int | None = None) -> Tensor:
        """k [..., n] cells in [0, 2^index_bits) -> outcomes [..., n] long (``& mask`` if given).

        ``low(idx)`` returns the fraction bits (int64 in [0, 2^low_bits)) of the draws at flat indices
        idx (ascending); ``table_of_position`` [n] picks the table per last-dim position (default 0).
        """
        fixed = self.fixed if mask is None else self.fixed_masked(mask)
        j = fixed.index_select(0, k.reshape(-1)).view(k.shape)
        tables = None
        if table_of_position is not None:
            tables = table_of_position << self.index_bits
            for pos in table_of_position.nonzero().squeeze(1).tolist():    # few positions use other tables
                j[..., pos] = fixed.index_select(0, k[..., pos].reshape(-1) + int(tables[pos])).view(j[..., pos].shape)
        flat = j.view(-1)
        straddle = (flat < 0).nonzero().squeeze(1)
        if straddle.numel():
            ks = k.reshape(-1).index_select(0, straddle)
            if tables is not None:
                ks += tables.index_select(0, straddle % k.shape[-1])
            out = torch.where(low(straddle) < self.residual.index_select(0, ks), self.keep_id.index_select(0, ks),
                              self.alias_id.index_select(0, ks))
            flat.index_copy_(0, straddle, out if mask is None else out & mask)
        return j

    @functools.lru_cache(maxsize=4)
    def fixed_masked(self, mask: int) -> Tensor:
        """``fixed`` with outcomes pre-masked (straddle markers kept), saving a pass per draw."""
        return torch.where(self.fixed < 0, self.fixed, self.fixed & mask)


def fraction_bits(generators: torch.Generator | Sequence[torch.Generator], numel: int, bits: int):
    """``low`` for :meth:`CellTable.sample`: fresh uniform ``bits``-bit integers for the requested flat
    indices, drawn from the generator that owns each index (the leading-dim slice of a stack: with G
    generators, flat index i belongs to generator i // (numel / G)), in ascending index order."""
    gens = [generators] if isinstance(generators, torch.Generator) else list(generators)
    per = numel // len(gens)

    def low(idx: Tensor) -> Tensor:
        out = torch.empty(idx.numel(), dtype=torch.long)
        n_of = torch.bincount(idx // per, minlength=len(gens)).tolist() if len(gens) > 1 else [idx.numel()]
        start = 0
        for g, n in zip(gens, n_of):
            if n:
                out[start:start + n].random_(0, 2 ** bits, generator=g)
                start += n
        return out

    return low


def counts(x: Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Token counts over the last dim: x [..., L] long -> [..., vocab_size] (scatter_add, no one-hot)."""
    out = torch.zeros(*x.shape[:-1], vocab_size, dtype=dtype, device=x.device)
    return out.scatter_add_(-1, x, torch.ones((), dtype=dtype, device=x.device).expand(x.shape))


def mix(x_a: Tensor, x_b: Tensor, r: float, generator: torch.Generator) -> Tensor:
    """Synthetic hijacking: each position (the last included) takes B's token with probability r."""
    take_b = torch.rand(x_a.shape, generator=generator) < r
    return torch.where(take_b, x_b, x_a)


@functools.lru_cache(maxsize=32)
def task_for(m: int, L: int, beta: float, rho: float, cluster: int) -> LCATask:
    return LCATask(m, L, beta, rho, cluster)
