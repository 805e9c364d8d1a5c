"""Exact log-probabilities of continuations under a causal LM: a plain reference loop and a fast,
batched scorer that shares every common token prefix.

A :class:`Request` is a context string and one or more targets. A target is scored as the
continuation ``" " + target`` (ROME's convention, see :func:`encode`): the result is the list of
per-token log-probabilities ``log P(a_j | context, a_<j)``.

Fast path. All sequences of one group (for hijacking: one record's hijacked prompts for every k and
both targets) are inserted into a token trie. Hijack prefixes nest (``S^k`` is a prefix of
``S^(k+1)``), both targets share their prompt, so the trie holds far fewer tokens than the
sequences. The trie is flattened into one row: each node attends to its ancestors and itself (a 4-D
additive attention mask) at position id = its depth, which reproduces, node for node, the causal
computation of every sequence it lies on. Small tries are packed together into rows (block-diagonal
masks), rows are batched by size, and logits are computed only at the nodes whose next token is
scored (moved to the end of the row and read with ``logits_to_keep``).
Where the tokenisation of a longer context does not extend a shorter one, the trie simply branches
earlier: exactness never depends on the prefix property, only the saving does.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import torch

from ..config import ConfigError


@dataclasses.dataclass(frozen=True)
class Request:
    """Score ``" " + t`` after ``context`` for each ``t`` in ``targets``; requests with the same
    ``group`` share one trie (one row of the batch)."""
    context: str
    targets: tuple[str, ...]
    group: Hashable = None


@dataclasses.dataclass
class Scored:
    """Per-token log-probabilities of one target; ``mode`` is "joint" or "fallback" (see encode)."""
    logprobs: np.ndarray
    mode: str

    @property
    def nll(self) -> float:
        """Mean per-token negative log-likelihood (ROME's length-normalised score)."""
        return float(-self.logprobs.mean())

    @property
    def first(self) -> float:
        return float(self.logprobs[0])

    @property
    def n(self) -> int:
        return int(self.logprobs.size)


def encode(tokenizer, context: str, target: str) -> tuple[list[int], list[int], str]:
    """Token ids of the context and of the continuation ``" " + target``.

    "joint": tokenise ``context`` and ``context + " " + target`` with the tokenizer's default special
    tokens; if the first is a proper prefix of the second, the remainder are the target ids.
    "fallback": otherwise ids(context) + ids(" " + target, no special tokens).
    """
    return _encode_many(tokenizer, [(context, target)])[0]


def _encode_many(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int], str]]:
    contexts = sorted({c for c, _ in pairs})
    ctx_ids = dict(zip(contexts, tokenizer(contexts)["input_ids"])) if contexts else {}
    joint = tokenizer([c + " " + t for c, t in pairs])["input_ids"] if pairs else []
    out = []
    for (c, t), j in zip(pairs, joint):
        p = list(ctx_ids[c])
        if not p:
            raise ConfigError(f"context: {c!r} encodes to no tokens (allowed: a non-empty prompt, or a "
                              "tokenizer that adds a BOS token)")
        if len(j) > len(p) and list(j[:len(p)]) == p:
            out.append((p, list(j[len(p):]), "joint"))
        else:
            tail = tokenizer(" " + t, add_special_tokens=False)["input_ids"]
            if not tail:
                raise ConfigError(f"target: {t!r} encodes to no tokens (allowed: a non-empty string)")
            out.append((p, list(tail), "fallback"))
    return out


# ----------------------------------------------------------------------------------------- plain loop

@torch.no_grad()
def plain_score(model, tokenizer, requests: Sequence[Request], progress: bool = False) -> list[list[Scored]]:
    """Reference: one forward pass per (context, target) sequence, default causal attention."""
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    out = []
    for req in tqdm(requests, desc="plain", disable=not progress, unit="req"):
        row = []
        for ctx, tgt, mode in _encode_many(tokenizer, [(req.context, t) for t in req.targets]):
            ids = torch.tensor([ctx + tgt], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
            row.append(Scored(lp.gather(1, torch.tensor(tgt, device=device)[:, None])[:, 0].cpu().numpy(), mode))
        out.append(row)
    return out


# --------------------------------------------------------------------------------------- fast scorer

class _Trie:
    """Token trie; nodes are added parent-first, so node index order is a valid topological order."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self._child: list[dict[int, int]] = []
        self._roots: dict[int, int] = {}

    def insert(self, ids: Sequence[int]) -> list[int]:
        path, node = [], -1
        for tok in ids:
            kids = self._roots if node < 0 else self._child[node]
            nxt = kids.get(tok)
            if nxt is None:
                nxt = len(self.tokens)
                kids[tok] = nxt
                self.tokens.append(tok)
                self.parent.append(node)
                self.depth.append(0 if node < 0 else self.depth[node] + 1)
                self._child.append({})
            path.append(nxt)
            node = nxt
        return path

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestors(self) -> np.ndarray:
        """Boolean [n, n]: entry (i, j) is True when node j is node i or one of its ancestors."""
        n = len(self.tokens)
        anc = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parent):
            if p >= 0:
                anc[i] = anc[p]
            anc[i, i] = True
        return anc


@dataclasses.dataclass
class _Row:
    trie: _Trie
    # per scored target: (request index, target index, mode, [(pred node, token), ...])
    items: list[tuple[int, int, str, list[tuple[int, int]]]]


def _build_rows(tokenizer, requests: Sequence[Request]) -> list[_Row]:
    pairs = [(r.context, t) for r in requests for t in r.targets]
    enc = iter(_encode_many(tokenizer, pairs))
    rows: dict[Hashable, _Row] = {}
    for ri, req in enumerate(requests):
        key = ("request", ri) if req.group is None else ("group", req.group)
        row = rows.setdefault(key, _Row(_Trie(), []))
        for ti in range(len(req.targets)):
            ctx, tgt, mode = next(enc)
            path = row.trie.insert(ctx + tgt)
            n = len(ctx)
            row.items.append((ri, ti, mode, [(path[n - 1 + j], tgt[j]) for j in range(len(tgt))]))
    return list(rows.values())


def _pack(rows: list[_Row], width: int) -> list[_Row]:
    """First-fit-decreasing packing of small tries into rows of at most ``width`` tokens (or one
    larger trie). Tries in one row never see each other: the ancestor mask is block-diagonal."""
    bins: list[list[_Row]] = []
    room: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r.trie)):
        n = len(row.trie)
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(row)
                room[b] -= n
                break
        else:
            bins.append([row])
            room.append(width - n)
    return [_merge(b) if len(b) > 1 else b[0] for b in bins]


def _merge(rows: list[_Row]) -> _Row:
    trie, items, off = _Trie(), [], 0
    for r in rows:
        trie.tokens += r.trie.tokens
        trie.depth += r.trie.depth
        trie.parent += [p + off if p >= 0 else -1 for p in r.trie.parent]
        items += [(ri, ti, mode, [(node + off, tok) for node, tok in pairs]) for ri, ti, mode, pairs in r.items]
        off += len(r.trie)
    return _Row(trie, items)


def _window(model) -> int | None:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    w = getattr(cfg, "sliding_window", None)
    return int(w) if w else None


class FastScorer:
    """Batched trie scorer. Tries are packed into rows as wide as the largest one (``pack``), rows of
    similar width are batched, ``token_budget`` bounds (rows x padded width) per forward pass.
    ``verify``: the first time a model is used, its longest request is re-scored by the plain loop.
    """

    def __init__(self, model, tokenizer, token_budget: int = 1024, max_rows: int = 64, pack: bool = True,
                 min_width: int = 256, verify: bool = True):
        self.model, self.tokenizer, self.verify = model, tokenizer, verify
        self.token_budget, self.max_rows = token_budget, max_rows
        self.pack, self.min_width = pack, min_width
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = {"nodes": 0, "padded": 0, "forwards": 0}

    def _batches(self, rows: list[_Row]) -> Iterable[list[_Row]]:
        batch: list[_Row] = []
        for row in sorted(rows, key=lambda r: len(r.trie)):
            width = max([len(r.trie) for r in batch] + [len(row.trie)])
            if batch and (width * (len(batch) + 1) > self.token_budget or len(batch) >= self.max_rows):
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    @torch.no_grad()
    def _forward(self, batch: list[_Row], out: list[list[Scored | None]]) -> None:
        # layout per row: [padding | nodes not read | nodes whose logits are read]
        width = max(len(r.trie) for r in batch)
        reads = [sorted({p for *_, pairs in r.items for p, _ in pairs}) for r in batch]
        keep = max(len(x) for x in reads)
        B = len(batch)
        ids = np.full((B, width), self.pad_id, dtype=np.int64)
        pos = np.zeros((B, width), dtype=np.int64)
        allowed = np.zeros((B, width, width), dtype=bool)
        allowed[:, np.arange(width), np.arange(width)] = True  # padding attends to itself only
        slot_of: list[dict[int, int]] = []
        for b, (row, rd) in enumerate(zip(batch, reads)):
            n = len(row.trie)
            rd_set = set(rd)
            order = [i for i in range(n) if i not in rd_set] + rd
            slots = np.arange(width - n, width)
            perm = np.asarray(order)
            ids[b, slots] = np.asarray(row.trie.tokens)[perm]
            pos[b, slots] = np.asarray(row.trie.depth)[perm]
            allowed[b, slots[:, None], slots[None, :]] = row.trie.ancestors()[perm][:, perm]
            slot_of.append({node: width - len(rd) + j - (width - keep) for j, node in enumerate(rd)})
        mask = torch.zeros((B, 1, width, width), dtype=self.dtype)
        mask.masked_fill_(~torch.from_numpy(allowed)[:, None], torch.finfo(self.dtype).min)
        kwargs = {"logits_to_keep": keep} if self._keep else {}
        logits = self.model(input_ids=torch.from_numpy(ids).to(self.device),
                            position_ids=torch.from_numpy(pos).to(self.device),
                            attention_mask=mask.to(self.device), use_cache=False, **kwargs).logits
        logits = logits[:, -keep:].float()
        logz = torch.logsumexp(logits, dim=-1)
        for b, row in enumerate(batch):
            for ri, ti, mode, pairs in row.items:
                sl = torch.tensor([slot_of[b][p] for p, _ in pairs], device=logits.device)
                tk = torch.tensor([t for _, t in pairs], device=logits.device)
                lp = logits[b, sl, tk] - logz[b, sl]
                out[ri][ti] = Scored(lp.cpu().numpy(), mode)
        self.stats["nodes"] += sum(len(r.trie) for r in batch)
        self.stats["padded"] += B * width
        self.stats["forwards"] += 1

    def score(self, requests: Sequence[Request], progress: bool = False) -> list[list[Scored]]:
        from tqdm.auto import tqdm
        rows = _build_rows(self.tokenizer, requests)
        if self.pack and rows:
            rows = _pack(rows, max(self.min_width, max(len(r.trie) for r in rows)))
        win = _window(self.model)
        deepest = max((max(r.trie.depth) + 1 for r in rows if len(r.trie)), default=0)
        if win is not None and deepest >= win:
            raise ConfigError(f"sequence length: {deepest} tokens exceeds the model's sliding window "
                              f"{win} (allowed: shorter prompts or fewer prepends)")
        out: list[list[Scored | None]] = [[None] * len(r.targets) for r in requests]
        with tqdm(total=len(rows), desc="scoring", unit="row", disable=not progress) as bar:
            for batch in self._batches(rows):
                self._forward(batch, out)
                bar.update(len(batch))
        if self.verify and requests and not getattr(self.model, "_assocmem_fast_verified", False):
            self._verify(requests, out)
        return out  # type: ignore[return-value]

    def _verify(self, requests: Sequence[Request], out: list[list[Scored]]) -> None:
        """Once per model: the longest request must match the plain loop (guards against models whose
        attention ignores a custom 4-D mask or position ids)."""
        i = max(range(len(requests)), key=lambda j: len(requests[j].context))
        diff = max_abs_diff(plain_score(self.model, self.tokenizer, [requests[i]]), [out[i]])
        if not diff < 1e-3:
            raise RuntimeError(f"fast scorer disagrees with the plain loop on this model (max |log-prob "
                               f"difference| {diff:.2e}); use method='plain'")
        self.model._assocmem_fast_verified = True


def fast_score(model, tokenizer, requests: Sequence[Request], progress: bool = False, **kw) -> list[list[Scored]]:
    return FastScorer(model, tokenizer, **kw).score(requests, progress=progress)


def max_abs_diff(a: Sequence[Sequence[Scored]], b: Sequence[Sequence[Scored]]) -> float:
    """Largest per-token log-probability difference between two results for the same requests."""
    return max((float(np.max(np.abs(x.logprobs - y.logprobs))) for ra, rb in zip(a, b) for x, y in zip(ra, rb)),
               default=0.0)
