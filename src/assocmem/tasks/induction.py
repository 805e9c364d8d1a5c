"""Bigram-with-triggers data of Bietti et al. (Birth of a Transformer, §4), on tiny Shakespeare.

Statistics (computed from the text, never shipped): the character vocabulary (sorted set, N = 65),
unigram pi_u(k) and bigram pi_b(j | i) = row-normalised counts over all consecutive pairs.

One sequence z_1..z_{T+1} (inputs z_1..z_T, targets z_2..z_{T+1}):
  triggers q_1..q_K  fixed (the K most frequent tokens, optionally skipping the top ``skip_top``)
                     or random (K distinct tokens drawn proportionally to pi_u, per sequence);
  outputs  o_k       uniform over all N tokens, or ~ pi_b(.|q_k) ("bigram"), or the OOD split
                     (train: uniform over ids < int(0.75 N); test: uniform over the rest);
  z_1 ~ pi_u;  z_t = o_k if z_{t-1} = q_k else z_t ~ pi_b(.|z_{t-1}).
Position label ``outs[t]`` (input position t): 0 if z_t is not a trigger, else the running count of
that trigger's occurrences up to and including t. outs >= 2: in-context target; outs = 1: first
occurrence; outs = 0: global-bigram position.

The chain is sequential in t but vectorised over the batch (inverse-CDF steps on a precomputed
cumulative bigram table). Randomness only through the ``torch.Generator`` passed in.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_write, cache_dir

DEFAULT_DATA_PATH = "../shared/data/tinyshakespeare/input.txt"
DATA_ENV = "ASSOCMEM_SHAKESPEARE"      # full path to input.txt
SHARED_ENV = "ASSOCMEM_SHARED_DATA"    # the shared data folder (as in tests/conftest.py)
OUTPUT_KINDS = ("uniform", "bigram", "ood_train", "ood_test")


def resolve_data_path(path: str = DEFAULT_DATA_PATH, key: str = "task.data_path") -> Path:
    """Locate the text. Order: ``path`` (relative to the working directory); if ``path`` is the
    default and missing: $ASSOCMEM_SHAKESPEARE, then $ASSOCMEM_SHARED_DATA/tinyshakespeare/input.txt,
    then the ``shared`` folder beside this checkout. Raises FileNotFoundError naming ``key``."""
    tried = [Path(path).expanduser()]
    if path == DEFAULT_DATA_PATH:
        if os.environ.get(DATA_ENV):
            tried.insert(0, Path(os.environ[DATA_ENV]))
        if os.environ.get(SHARED_ENV):
            tried.append(Path(os.environ[SHARED_ENV]) / "tinyshakespeare" / "input.txt")
        tried.append(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "tinyshakespeare"
                     / "input.txt")
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{key}: tiny Shakespeare text not found at {path!r} (resolved against {os.getcwd()}); "
        f"set {key}=/path/to/input.txt or ${DATA_ENV} (the char-rnn data/tinyshakespeare/input.txt)")


@dataclasses.dataclass(frozen=True)
class CharStats:
    """Character statistics of a text.

    chars: the sorted vocabulary (str of length N); unigram_counts [N]; bigram_counts [N, N]
    (row i = previous char); pi_u [N] and pi_b [N, N] as float64 tensors.
    """
    chars: str
    unigram_counts: np.ndarray
    bigram_counts: np.ndarray
    n_chars: int

    @property
    def N(self) -> int:
        return len(self.chars)

    @functools.cached_property
    def pi_u(self) -> Tensor:
        return torch.from_numpy(self.unigram_counts / self.unigram_counts.sum())

    @functools.cached_property
    def pi_b(self) -> Tensor:
        c = self.bigram_counts.astype(np.float64)
        return torch.from_numpy(c / c.sum(1, keepdims=True))

    def encode(self, s: str) -> Tensor:
        idx = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([idx[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def top_tokens(self, k: int, skip: int = 0) -> Tensor:
        """Ids of the k most frequent tokens after skipping the ``skip`` most frequent (ties by id)."""
        order = np.lexsort((np.arange(self.N), -self.unigram_counts))
        return torch.from_numpy(order[skip:skip + k].copy()).long()

    def bigram_entropy(self) -> float:
        """pi_u-weighted entropy of pi_b(.|i), in nats."""
        pb = self.pi_b
        h = -(pb * torch.where(pb > 0, pb.log(), torch.zeros_like(pb))).sum(1)
        return float((self.pi_u * h).sum())


def _stats_from_bytes(data: bytes) -> CharStats:
    arr = np.frombuffer(data, dtype=np.uint8)
    present = np.bincount(arr, minlength=256) > 0
    byte_ids = np.flatnonzero(present)                      # sorted set of characters
    lut = np.full(256, -1, np.int64)
    lut[byte_ids] = np.arange(len(byte_ids))
    ids = lut[arr]
    N = len(byte_ids)
    uni = np.bincount(ids, minlength=N)
    bi = np.bincount(ids[:-1] * N + ids[1:], minlength=N * N).reshape(N, N)
    return CharStats("".join(chr(b) for b in byte_ids), uni, bi, len(arr))


@functools.lru_cache(maxsize=4)
def _load_stats(path: str, size: int, mtime: float) -> CharStats:
    data = Path(path).read_bytes()
    digest = hashlib.md5(data).hexdigest()
    cache = cache_dir() / f"charstats-{digest}.npz"
    if cache.exists():
        try:
            z = np.load(cache)
            return CharStats(str(z["chars"]), z["uni"], z["bi"], int(z["n"]))
        except (OSError, KeyError, ValueError):
            pass
    st = _stats_from_bytes(data)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, chars=np.array(st.chars), uni=st.unigram_counts, bi=st.bigram_counts, n=st.n_chars)
    try:  # a read-only home is fine: the statistics are recomputed next time
        atomic_write(cache, write)
    except OSError:
        pass
    return st


def load_stats(path: str = DEFAULT_DATA_PATH, key: str = "task.data_path") -> CharStats:
    """Character statistics of the text at ``path`` (see :func:`resolve_data_path`), cached."""
    p = resolve_data_path(path, key)
    s = p.stat()
    return _load_stats(str(p.resolve()), s.st_size, s.st_mtime)


@dataclasses.dataclass
class Batch:
    """x [B, T] inputs, y [B, T] targets, outs [B, T] position labels, triggers [B, K], outputs [B, K]."""
    x: Tensor
    y: Tensor
    outs: Tensor
    triggers: Tensor
    outputs: Tensor

    def chained(self) -> Tensor:
        """[B] bool: some trigger's output is itself a trigger. Such a sequence chains trigger to
        trigger (an output equal to its own trigger repeats it forever), so nearly every position
        is in-context."""
        return (self.outputs[:, :, None] == self.triggers[:, None, :]).any(2).any(1)


def position_labels(x: Tensor, triggers: Tensor) -> Tensor:
    """outs [B, T]: running occurrence count of the trigger at each position (0 = not a trigger).

    x [B, T] tokens, triggers [B, K] (distinct within a row)."""
    eq = (x[:, :, None] == triggers[:, None, :])                 # [B, T, K]
    cnt = eq.long().cumsum(1)
    return (cnt * eq).sum(-1)


class TriggerBigram:
    """Vectorised sampler of bigram-with-triggers sequences for one setting."""

    def __init__(self, stats: CharStats, T: int = 256, K: int = 3, fixed_triggers: bool = False,
                 skip_top: int = 0, outputs: str = "uniform", no_repeat: bool = False):
        if outputs not in OUTPUT_KINDS:
            raise ValueError(f"outputs: {outputs!r} is not allowed (allowed: {', '.join(OUTPUT_KINDS)})")
        self.stats, self.T, self.K = stats, T, K
        self.fixed_triggers, self.skip_top, self.outputs, self.no_repeat = fixed_triggers, skip_top, outputs, no_repeat
        self.N = stats.N
        self.pi_u = stats.pi_u.float()
        self.pi_b = stats.pi_b.float()
        cum = stats.pi_b.cumsum(1)
        cum[:, -1] = 1.0 + 1e-6                                     # inverse CDF never runs off the end
        self.cum_b = cum.float()
        self.cum_u = stats.pi_u.cumsum(0).float()
        self.cum_u[-1] = 1.0 + 1e-6
        self.fixed = stats.top_tokens(K, skip_top)
        self.n_train_out = int(0.75 * self.N)

    def sample_triggers(self, B: int, g: torch.Generator) -> Tensor:
        if self.fixed_triggers:
            return self.fixed[None].expand(B, -1).clone()
        return torch.multinomial(self.pi_u[None].expand(B, -1), self.K, replacement=False, generator=g)

    def sample_outputs(self, trig: Tensor, g: torch.Generator, kind: str | None = None) -> Tensor:
        kind = kind or self.outputs
        B, K = trig.shape
        if kind == "uniform":
            if self.no_repeat:
                r = torch.randint(self.N - 1, (B, K), generator=g)
                return r + (r >= trig).long()
            return torch.randint(self.N, (B, K), generator=g)
        if kind == "bigram":
            return torch.multinomial(self.pi_b[trig.reshape(-1)], 1, generator=g).view(B, K)
        if kind == "ood_train":
            return torch.randint(self.n_train_out, (B, K), generator=g)
        return torch.randint(self.n_train_out, self.N, (B, K), generator=g)

    def chain(self, B: int, T1: int, trig: Tensor, outp: Tensor, g: torch.Generator,
              start: Tensor | None = None) -> Tensor:
        """z [B, T1]: z_1 ~ pi_u (or one step after the tokens ``start`` [B]), then each step maps a
        trigger to its output and any other token to a bigram draw."""
        u = torch.rand(B, T1, generator=g)
        z = torch.empty(B, T1, dtype=torch.long)
        if start is None:
            z[:, 0] = torch.searchsorted(self.cum_u, u[:, 0].contiguous(), right=True).clamp(max=self.N - 1)
            first = 1
        else:
            first = 0
        prev = z[:, 0] if start is None else start
        for t in range(first, T1):
            nxt = torch.searchsorted(self.cum_b[prev], u[:, t:t + 1].contiguous(), right=True)[:, 0].clamp(max=self.N - 1)
            hit = prev[:, None] == trig                               # [B, K]
            anyhit = hit.any(1)
            out = torch.gather(outp, 1, hit.float().argmax(1, keepdim=True))[:, 0]
            prev = torch.where(anyhit, out, nxt)
            z[:, t] = prev
        return z

    def sample(self, B: int, g: torch.Generator, outputs: str | None = None) -> Batch:
        trig = self.sample_triggers(B, g)
        outp = self.sample_outputs(trig, g, outputs)
        z = self.chain(B, self.T + 1, trig, outp, g)
        x, y = z[:, :-1], z[:, 1:]
        return Batch(x, y, position_labels(x, trig), trig, outp)


def delayed_batch(ds: TriggerBigram, B: int, L0: int, g: torch.Generator) -> Batch:
    """Sequences of length L0 + ds.T whose first L0 tokens contain no trigger (a bigram chain that
    resamples trigger hits), followed by ds.T tokens of the trigger process; outs counts only the
    second part. Fixed or random triggers as in ``ds``."""
    trig = ds.sample_triggers(B, g)
    outp = ds.sample_outputs(trig, g)
    parts = []
    if L0 > 0:
        parts.append(filler_chain(ds, B, L0, trig, g))
        start = parts[0][:, -1]
    else:
        start = None
    z2 = ds.chain(B, ds.T + 1, trig, outp, g, start=start)
    z = torch.cat(parts + [z2], 1) if parts else z2
    x, y = z[:, :-1], z[:, 1:]
    outs = position_labels(x, trig)
    outs[:, :L0] = 0
    return Batch(x, y, outs, trig, outp)


def filler_chain(ds: TriggerBigram, B: int, L: int, avoid: Tensor, g: torch.Generator,
                 start: Tensor | None = None) -> Tensor:
    """[B, L] global-bigram chain that never emits a token in ``avoid`` [B, K] (per-step resampling
    = sampling from pi_b restricted to the allowed tokens)."""
    N = ds.N
    allowed = torch.ones(B, N).scatter_(1, avoid, 0.0)
    z = torch.empty(B, L, dtype=torch.long)
    if start is None:
        z[:, 0] = torch.multinomial(ds.pi_u[None] * allowed, 1, generator=g)[:, 0]
    else:
        z[:, 0] = torch.multinomial(ds.pi_b[start] * allowed + 1e-12 * allowed, 1, generator=g)[:, 0]
    for t in range(1, L):
        w = ds.pi_b[z[:, t - 1]] * allowed
        w = torch.where(w.sum(1, keepdim=True) > 0, w, allowed)
        z[:, t] = torch.multinomial(w, 1, generator=g)[:, 0]
    return z
