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
        # fraction words reserved per batch for draws in straddling cells: mean + 8 sd + 8, so that
        # running out (then drawn afresh from the same generator) essentially never happens
        self._straddle_rate = (self.cells.straddle_fraction(0), self.cells.straddle_fraction(1))

    def reserve(self, batch: int) -> int:
        """Fraction words reserved per batch of ``batch`` sequences (see :meth:`draw`)."""
        p_ctx, p_last = self._straddle_rate
        mu = batch * ((self.L - 1) * p_ctx + p_last)
        return math.ceil(mu + 8 * math.sqrt(mu) + 8)

    def n_words(self, batch: int) -> int:
        """Random words per batch: four 16-bit fields each for the L cells and the target of every
        sequence, then :meth:`reserve` fraction words."""
        return -(-batch * (self.L + 1) // 4) + self.reserve(batch)

    def draw(self, batch: int, generator: torch.Generator, out: Tensor | None = None) -> Tensor:
        """All fixed-size randomness of ``batch`` sequences with one generator call: int64 words
        [n_words(batch)], uniform on [0, 2^63) (optionally into a preallocated ``out``)."""
        w = out if out is not None else torch.empty(self.n_words(batch), dtype=torch.long)
        return w.random_(generator=generator)

    def decode(self, words: Tensor, batch: int, generators: torch.Generator | Sequence[torch.Generator],
               return_noise: bool = False):
        """Turn draws into sequences, exactly: words [..., n_words(batch)] from :meth:`draw`.

        Each 63-bit word holds four 16-bit fields; a field's low 15 bits are a uniform cell of the
        alias tables (:class:`CellTable`) or, for the last field of each sequence, its target t (low m
        bits). Position l < L draws outcome j from the context table, position L from the last-token
        table; token x = t xor (j mod V); noise = j >= V. Draws in a straddling cell take their
        fraction bits from the reserved words, in order, and, should those run out, afresh from
        ``generators`` (one generator, or one per index of the leading dims, flattened: a stack of
        instances decodes exactly as each would alone).

        Returns x [..., batch, L], t [..., batch] (long) and, if ``return_noise``, noise
        [..., batch, L-1] (True where position l < L was a uniform noise draw).
        """
        V, L, lead = self.V, self.L, words.shape[:-1]
        n_fields = batch * (L + 1)
        n_cell_words = -(-n_fields // 4)
        fields = words[..., :n_cell_words].view(torch.int16)[..., :n_fields].view(*lead, batch, L + 1)
        k = torch.empty(*lead, batch, L, dtype=torch.int32)       # int32 until the output: half the traffic
        torch.bitwise_and(fields[..., :L], 2 ** 15 - 1, out=k)
        t = torch.bitwise_and(fields[..., L], V - 1).int()
        reserve = words[..., n_cell_words:].reshape(-1, words.shape[-1] - n_cell_words)
        low = fraction_bits(reserve, generators, batch * L, self.cells.low_bits)
        j = self.cells.sample(k, low, last_table=1, mask=None if return_noise else V - 1)
        x = torch.empty(j.shape, dtype=torch.long)
        if not return_noise:
            return torch.bitwise_xor(j, t[..., None], out=x), t.long()
        noise = (j[..., :-1] & V) != 0
        return torch.bitwise_xor(j.bitwise_and_(V - 1), t[..., None], out=x), t.long(), noise

    def sample(self, batch: int, generator: torch.Generator, return_noise: bool = False):
        """Draw ``batch`` sequences: x [batch, L] long, t [batch] long (and the noise mask)."""
        return self.decode(self.draw(batch, generator), batch, generator, return_noise)


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
    per column straddles theta (``fixed`` = -1 - its cell index, counted over the stacked tables), and
    only draws landing there (at most a fraction C / 2^15: 1/256 at m = 6, 1/16 at m = 10) draw their
    low bits and compare them with the residual threshold in exact integer arithmetic.
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
            straddling = (lo < th) & (th < hi)
            fixed.append(torch.where(straddling, -1 - (cell + len(fixed) * cell.numel()), f))
            keep_id.append(col)
            alias_id.append(alias[col])
            residual.append(th - lo)
        self.fixed = torch.cat(fixed)
        self.keep_id, self.alias_id, self.residual = torch.cat(keep_id), torch.cat(alias_id), torch.cat(residual)

    def sample(self, k: Tensor, low: Callable[[Tensor], Tensor], last_table: int = 0,
               mask: int | None = None) -> Tensor:
        """k [..., n] cells in [0, 2^15) of table 0 (the last position: of ``last_table``) -> outcomes
        [..., n] int32 (``& mask`` if given). ``low(idx)`` returns the fraction bits (int64 in
        [0, 2^low_bits)) of the draws at flat indices idx, which come in ascending order."""
        fixed = self.fixed_masked(-1 if mask is None else mask)
        j = fixed.index_select(0, k.reshape(-1)).view(k.shape)
        offset = last_table << self.index_bits
        if offset:
            j[..., -1] = fixed.index_select(0, k[..., -1].reshape(-1) + offset).view(j.shape[:-1])
        flat = j.view(-1)
        straddle = _negative_positions(j.view(-1, j.shape[-1]))
        if straddle.numel():
            ks = flat.index_select(0, straddle).long().neg_().sub_(1)   # the straddling cells themselves
            out = torch.where(low(straddle) < self.residual.index_select(0, ks), self.keep_id.index_select(0, ks),
                              self.alias_id.index_select(0, ks))
            flat.index_copy_(0, straddle, (out if mask is None else out & mask).int())
        return j

    def straddle_fraction(self, table: int) -> float:
        """Share of table ``table``'s cells that straddle a threshold: the chance that a draw needs
        fraction bits."""
        n = 2 ** self.index_bits
        return float((self.fixed[table * n:(table + 1) * n] < 0).double().mean())

    @functools.lru_cache(maxsize=4)
    def fixed_masked(self, mask: int) -> Tensor:
        """``fixed`` as int32 with outcomes pre-masked (straddle markers kept; -1 keeps all bits),
        saving a pass per draw."""
        return torch.where(self.fixed < 0, self.fixed, self.fixed & mask).int()


def _negative_positions(rows: Tensor) -> Tensor:
    """Flat indices (ascending) of the negative entries of rows [n, w]: a min per row first, then
    the search only in rows that have one (straddling draws are rare: at most C / 2^15 of the draws,
    about 4 in 1000 at m = 6)."""
    hit = (rows.amin(1) < 0).nonzero().squeeze(1)
    r, c = (rows.index_select(0, hit) < 0).nonzero(as_tuple=True)
    return hit.index_select(0, r) * rows.shape[1] + c


def fraction_bits(reserve: Tensor, generators: torch.Generator | Sequence[torch.Generator], per: int,
                  bits: int) -> Callable[[Tensor], Tensor]:
    """``low`` for :meth:`CellTable.sample` over a stack of G instances with ``per`` draws each:
    instance g's straddling draws, in ascending order, take the low ``bits`` of its reserved words
    reserve[g] [G, F] one by one; beyond F, fresh words from ``generators[g]`` (one generator: G = 1)."""
    gens = [generators] if isinstance(generators, torch.Generator) else list(generators)
    G, F = reserve.shape
    assert len(gens) == G, "one generator per instance of the stack"

    def low(idx: Tensor) -> Tensor:
        owner = idx // per
        n_of = torch.bincount(owner, minlength=G)
        rank = torch.arange(idx.numel()) - (n_of.cumsum(0) - n_of).index_select(0, owner)
        out = reserve.reshape(-1).index_select(0, owner * F + rank.clamp(max=F - 1))
        if F < int(n_of.max()):                        # reserve exhausted: continue each stream afresh
            for g in (n_of > F).nonzero().squeeze(1).tolist():
                sel = ((owner == g) & (rank >= F)).nonzero().squeeze(1)
                out[sel] = torch.empty(sel.numel(), dtype=torch.long).random_(generator=gens[g])
        return out.bitwise_and_(2 ** bits - 1)

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
