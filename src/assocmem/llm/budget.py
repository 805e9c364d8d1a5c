"""How much one forward pass of the fast scorer may hold in memory: a simple cost model in
"token-equivalents" and a default budget from the free memory of the model's device.

Cost model. A forward over ``B`` rows of padded width ``W`` that reads logits at ``K`` positions per
row holds, at its peak, roughly

    activations   B * W * a              a = s * (6 * hidden + 3 * intermediate)  bytes per token
    masks         B * W * W * m          m = n_masks * s + 2  (the model-dtype mask(s) + 2 boolean stagings)
    attention     B * W * W * h          h = heads * s (one score matrix per head; eager attention also
                                         keeps an fp32 softmax: heads * (2 s + 4))
    logits        B * K * l              l = vocab * (s + 8)  (model-dtype logits, an fp32 copy, fp32 temps)

with ``s`` the bytes of the model dtype. ``a`` is a rough upper bound of what one decoder layer keeps
per token at once (residual, normed input, q/k/v, attention output; the MLP's gate, up and product);
weights are already resident and not counted. The cost in token-equivalents is
``B * W + (masks + attention + logits) / a``: a budget of ``T`` token-equivalents means about
``T * a`` bytes. It is an honest order of magnitude, not a measurement: fused attention kernels may
hold less, allocator fragmentation more. The out-of-memory back-off in
:class:`~assocmem.llm.scoring.FastScorer` covers the difference.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .devices import free_memory_bytes

MIN_BATCH_TOKENS = 256          # the default budget never goes below this ...
MAX_BATCH_TOKENS = 1 << 22      # ... or above this
CPU_CAP = 32768                 # on CPU larger forwards do not run faster; keep the default modest
FRACTION = {"cuda": 0.5, "cpu": 0.25}   # share of the free memory a forward may plan to use
UNKNOWN_FREE_TOKENS = 4096      # default when free memory cannot be read


@dataclasses.dataclass(frozen=True)
class CostModel:
    act_bytes: int      # a: bytes per token of activations
    mask_bytes: int     # m: bytes per mask element (all masks + staging)
    score_bytes: int    # h: bytes per attention-score element (all heads)
    logit_bytes: int    # l: bytes per read position

    def tokens(self, rows: int, width: int, reads: int) -> int:
        """Cost of a forward over ``rows`` x ``width`` reading ``reads`` positions per row, in token-equivalents."""
        extra = rows * width * width * (self.mask_bytes + self.score_bytes) + rows * reads * self.logit_bytes
        return rows * width + math.ceil(extra / self.act_bytes)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _cfg(model):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None


def cost_model(model, dtype: torch.dtype, vocab: int, n_masks: int = 1) -> CostModel:
    """The cost model for ``model`` computing in ``dtype`` (config sizes; generic guesses where absent)."""
    cfg = _cfg(model)

    def get(*keys, default):
        for k in keys:
            v = getattr(cfg, k, None)
            if isinstance(v, int) and v > 0:
                return v
        return default
    s = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hidden = get("hidden_size", "n_embd", "d_model", default=1024)
    inter = get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    heads = get("num_attention_heads", "n_head", default=16)
    vocab = get("vocab_size", default=vocab)
    eager = getattr(cfg, "_attn_implementation", None) == "eager"
    return CostModel(act_bytes=s * (6 * hidden + 3 * inter), mask_bytes=n_masks * s + 2,
                     score_bytes=heads * (2 * s + 4) if eager else heads * s, logit_bytes=vocab * (s + 8))


def default_batch_tokens(device: torch.device, cost: CostModel) -> tuple[int, dict]:
    """A budget in token-equivalents from the free memory on ``device``: a conservative fraction
    (:data:`FRACTION`) divided by the activation bytes per token, clamped to
    [:data:`MIN_BATCH_TOKENS`, :data:`MAX_BATCH_TOKENS`] (on CPU also to :data:`CPU_CAP`).
    Returns the budget and how it was chosen (for ``FastScorer.stats``)."""
    free, source = free_memory_bytes(device)
    kind = torch.device(device).type
    if free is None:
        return UNKNOWN_FREE_TOKENS, {"budget_source": source, "free_bytes": None}
    frac = FRACTION.get(kind, 0.25)
    tokens = int(frac * free / cost.act_bytes)
    hi = min(MAX_BATCH_TOKENS, CPU_CAP) if kind == "cpu" else MAX_BATCH_TOKENS
    return max(MIN_BATCH_TOKENS, min(hi, tokens)), {"budget_source": f"{frac} x {source}", "free_bytes": free}


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error from torch (any device) or the host allocator."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
