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
import logging
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from ..config import ConfigError
from .budget import cost_model, default_batch_tokens, is_oom
from .trie import Row, Trie, pack

log = logging.getLogger(__name__)

#: Version of the scoring procedure: part of every stored score's content key. Bump it whenever a
#: change could alter any score (tokenisation rule, masks, dtype handling, what is read); pure speed
#: or memory changes that keep every value identical do not bump it.
SCORER_VERSION = "2"
VERIFY_TOL_16BIT = 0.5


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

def _build_rows(tokenizer, requests: Sequence[Request]) -> list[Row]:
    pairs = [(r.context, t) for r in requests for t in r.targets]
    enc = iter(_encode_many(tokenizer, pairs))
    rows: dict[Hashable, Row] = {}
    for ri, req in enumerate(requests):
        key = ("request", ri) if req.group is None else ("group", req.group)
        row = rows.setdefault(key, Row(Trie(), []))
        for ti in range(len(req.targets)):
            ctx, tgt, mode = next(enc)
            path = row.trie.insert(ctx + tgt)
            n = len(ctx)
            row.items.append((ri, ti, mode, [(path[n - 1 + j], tgt[j]) for j in range(len(tgt))]))
    return list(rows.values())



def _windows(model) -> tuple[int | None, bool]:
    """(sliding window, whether per-layer masks can be passed): models whose config lists
    ``layer_types`` with "sliding_attention" (gemma-2/3 style) take a dict of masks keyed by layer
    type, so the scorer builds the windowed mask itself; for others a window is a hard limit."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    return (int(w) if w else None), bool(w) and "sliding_attention" in types


class FastScorer:
    """Batched trie scorer.

    Tries are packed into rows as wide as the largest one (``pack``, at least ``min_width``); rows
    of similar width are batched so that one forward costs at most ``batch_tokens`` token-equivalents
    (see :mod:`assocmem.llm.budget`: padded tokens plus the B x W x W masks, attention scores and the
    logits read, converted at the model's activation bytes per token). ``batch_tokens=None``: a
    default from the free memory of the model's device. A single row is always run, whatever its cost.

    Out of memory (``torch.OutOfMemoryError`` or a RuntimeError saying "out of memory"): the budget is
    halved (below the failed batch's cost), the same rows are split again and redone, with a
    ``logging`` warning; results are written only after a forward succeeds, so nothing is lost or
    counted twice. When one row alone does not fit, a ``ConfigError`` says so.

    ``verify``: the first time a model is used, its longest request is re-scored by the plain loop.
    ``token_budget``: deprecated name of ``batch_tokens``. ``stats``: nodes, padded, forwards,
    batch_tokens (current), batch_tokens_initial, budget_source, free_bytes, oom_backoffs, cost_model.
    """

    def __init__(self, model, tokenizer, batch_tokens: int | None = None, max_rows: int = 64, pack: bool = True,
                 min_width: int = 256, verify: bool = True, token_budget: int | None = None):
        if batch_tokens is None and token_budget is not None:
            batch_tokens = token_budget
        if batch_tokens is not None and (not isinstance(batch_tokens, int) or batch_tokens < 1):
            raise ConfigError(f"batch_tokens: {batch_tokens} (allowed: a positive integer, or None for a "
                              "default from free memory)")
        self.model, self.tokenizer, self.verify = model, tokenizer, verify
        self.max_rows, self.pack, self.min_width = max_rows, pack, min_width
        emb = getattr(model, "get_input_embeddings", lambda: None)()
        first = emb.weight if emb is not None and hasattr(emb, "weight") else next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.window, self.per_layer_masks = _windows(model) if hasattr(model, "config") else (None, False)
        self.cost = cost_model(model, self.dtype, len(tokenizer), n_masks=2 if self.per_layer_masks else 1)
        if batch_tokens is None:
            batch_tokens, how = default_batch_tokens(self.device, self.cost)
        else:
            how = {"budget_source": "given", "free_bytes": None}
        self.batch_tokens = batch_tokens
        self.stats = {"nodes": 0, "padded": 0, "forwards": 0, "batch_tokens": batch_tokens,
                      "batch_tokens_initial": batch_tokens, "oom_backoffs": 0, **how,
                      "cost_model": self.cost.as_dict()}

    @property
    def token_budget(self) -> int:      # deprecated read access
        return self.batch_tokens

    def _cost(self, batch: list[Row]) -> int:
        return self.cost.tokens(len(batch), max(len(r.trie) for r in batch), max(len(r.reads) for r in batch))

    def _next_batch(self, rows: list[Row], start: int) -> list[Row]:
        """The rows from ``start`` on (sorted by width) that fit the budget; at least one."""
        end = start + 1
        while end < len(rows) and end - start < self.max_rows and self._cost(rows[start:end + 1]) <= self.batch_tokens:
            end += 1
        return rows[start:end]

    def _back_off(self, batch: list[Row]) -> None:
        cost = self._cost(batch)
        if len(batch) == 1:
            raise ConfigError(f"batch_tokens: one row of {len(batch[0].trie)} tokens (~{cost} token-equivalents) "
                              f"does not fit in the free memory of {self.device} even alone (allowed: shorter "
                              "prompts or fewer prepends, a smaller dtype, a device with more memory)")
        self.batch_tokens = max(1, min(self.batch_tokens, cost) // 2)
        self.stats["batch_tokens"] = self.batch_tokens
        self.stats["oom_backoffs"] += 1
        log.warning("out of memory on a forward of %d rows x %d tokens; batch_tokens halved to %d, "
                    "redoing those rows", len(batch), max(len(r.trie) for r in batch), self.batch_tokens)

    def _masks(self, batch: list[Row], width: int, perms: list[np.ndarray]) -> torch.Tensor | dict:
        """Additive [B, 1, W, W] mask(s): each node sees its ancestors and itself (padding itself only);
        with per-layer masks also the sliding-window one (depth difference < window)."""
        B = len(batch)
        allowed = np.zeros((B, width, width), dtype=bool)
        allowed[:, np.arange(width), np.arange(width)] = True
        near = allowed.copy() if self.per_layer_masks else None
        for b, (row, perm) in enumerate(zip(batch, perms)):
            n = len(row.trie)
            sl = slice(width - n, width)
            anc = row.trie.ancestors()[perm][:, perm]
            allowed[b, sl, sl] = anc
            if near is not None:
                depth = np.asarray(row.trie.depth)[perm]
                near[b, sl, sl] = anc & (depth[:, None] - depth[None, :] < self.window)

        def additive(ok: np.ndarray) -> torch.Tensor:
            mask = torch.zeros((B, 1, width, width), dtype=self.dtype)
            mask.masked_fill_(~torch.from_numpy(ok)[:, None], torch.finfo(self.dtype).min)
            return mask.to(self.device)
        if near is None:
            return additive(allowed)
        return {"full_attention": additive(allowed), "sliding_attention": additive(near)}

    @torch.no_grad()
    def _forward(self, batch: list[Row], out: list[list[Scored | None]]) -> None:
        # layout per row: [padding | nodes not read | nodes whose logits are read]
        width = max(len(r.trie) for r in batch)
        keep = max(len(r.reads) for r in batch)
        B = len(batch)
        ids = np.full((B, width), self.pad_id, dtype=np.int64)
        pos = np.zeros((B, width), dtype=np.int64)
        slot_of: list[dict[int, int]] = []
        perms = []
        for b, row in enumerate(batch):
            n, rd = len(row.trie), row.reads
            rd_set = set(rd)
            perm = np.asarray([i for i in range(n) if i not in rd_set] + rd)
            perms.append(perm)
            ids[b, width - n:] = np.asarray(row.trie.tokens)[perm]
            pos[b, width - n:] = np.asarray(row.trie.depth)[perm]
            slot_of.append({node: keep - len(rd) + j for j, node in enumerate(rd)})
        mask = self._masks(batch, width, perms)
        kwargs = {"logits_to_keep": keep} if self._keep else {}
        logits = self.model(input_ids=torch.from_numpy(ids).to(self.device),
                            position_ids=torch.from_numpy(pos).to(self.device),
                            attention_mask=mask, use_cache=False, **kwargs).logits
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
            rows = pack(rows, max(self.min_width, max(len(r.trie) for r in rows)))
        deepest = max((max(r.trie.depth) + 1 for r in rows if len(r.trie)), default=0)
        if self.window is not None and not self.per_layer_masks and deepest > self.window:
            raise ConfigError(f"sequence length: {deepest} tokens exceeds the model's sliding window "
                              f"{self.window} (allowed: shorter prompts or fewer prepends)")
        out: list[list[Scored | None]] = [[None] * len(r.targets) for r in requests]
        rows.sort(key=lambda r: len(r.trie))
        start = 0
        with tqdm(total=len(rows), desc="scoring", unit="row", disable=not progress) as bar:
            while start < len(rows):
                batch = self._next_batch(rows, start)
                try:
                    self._forward(batch, out)
                except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
                    if not is_oom(e):
                        raise
                    oom = True
                else:
                    oom = False
                if oom:             # outside the except block, so the failed forward's tensors are freed
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    self._back_off(batch)
                    continue
                start += len(batch)
                bar.update(len(batch))
        if self.verify and requests and not getattr(self.model, "_assocmem_fast_verified", False):
            self._verify(requests, out)
        return out  # type: ignore[return-value]

    def _verify(self, requests: Sequence[Request], out: list[list[Scored]]) -> None:
        """Once per model: the longest request must match the plain loop (guards against models whose
        attention ignores a custom 4-D mask or position ids). Tolerance (max |log-prob difference|):
        1e-3 in float32; :data:`VERIFY_TOL_16BIT` in bfloat16/float16, where a batched forward rounds
        differently from a one-sequence forward (observed up to ~0.1 on SmolLM2-135M in bf16), while a
        dropped tree mask lets prompts see other branches and moves log-probs by whole nats."""
        i = max(range(len(requests)), key=lambda j: len(requests[j].context))
        diff = max_abs_diff(plain_score(self.model, self.tokenizer, [requests[i]]), [out[i]])
        tol = 1e-3 if self.dtype == torch.float32 else VERIFY_TOL_16BIT
        if not diff < tol:
            raise RuntimeError(f"fast scorer disagrees with the plain loop on this model (max |log-prob "
                               f"difference| {diff:.2e} >= {tol:g} in {self.dtype}); use method='plain'")
        self.model._assocmem_fast_verified = True


def fast_score(model, tokenizer, requests: Sequence[Request], progress: bool = False, **kw) -> list[list[Scored]]:
    return FastScorer(model, tokenizer, **kw).score(requests, progress=progress)


def max_abs_diff(a: Sequence[Sequence[Scored]], b: Sequence[Sequence[Scored]]) -> float:
    """Largest per-token log-probability difference between two results for the same requests."""
    return max((float(np.max(np.abs(x.logprobs - y.logprobs))) for ra, rb in zip(a, b) for x, y in zip(ra, rb)),
               default=0.0)
