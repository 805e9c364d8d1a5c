"""The training step of the simplified induction model: exact, micro-batched, optionally split over
forked single-threaded processes.

``chunked_step`` computes the gradient of the per-member mean loss over a whole batch [S,B,T] chunk by
chunk (``chunk_bounds`` cuts the chunks); with the in-context loss only the loss positions get
layer-2 work (``loss_positions``), and each chunk is padded only to its own maximum. Tested equal to
one full-batch backward in tests/test_induction_fast.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.induction import SimplifiedInduction
from ..models.induction_fast import loss_logits
from ..training import CAN_FORK, forked_map


def loss_positions(outs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded query positions of outs >= 2: (qpos [S,B,Q], valid [S,B,Q]) with Q the max count."""
    mask = outs >= 2
    Q = max(int(mask.sum(-1).max()), 1)
    idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :Q]
    return idx, torch.gather(mask, -1, idx)


def stat_parts(ce: torch.Tensor, hit: torch.Tensor, outs: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-position (value, weight) pairs of the training statistics when every position is scored.
    ce, hit, outs [S,B,T]."""
    first10 = torch.arange(outs.shape[-1], device=outs.device) < 10
    ic = (outs >= 2).float()
    return {"loss_head": (ce, ic), "acc_end": (hit, ic), "loss_bigram": (ce, (outs == 0).float()),
            "acc_tot": (hit, (outs >= 1).float()), "acc_start": (hit, ((outs >= 1) & first10).float())}


def chunked_step(model: SimplifiedInduction, x: torch.Tensor, y: torch.Tensor, outs: torch.Tensor,
                 loss: str, micro_batch: int, parts: int = 1) -> dict[str, torch.Tensor]:
    """Backward of the per-member mean loss over the whole batch, in chunks of sequences (grads
    accumulate into ``.grad``); returns per-member statistics [S] (detached).

    x, y, outs [S,B,T]. loss ``icl``: mean CE over outs >= 2, logits only at those positions; ``all``:
    mean CE over all positions. The normalisers are the full-batch counts, so the accumulated gradient
    is the full-batch one. Chunks (:func:`chunk_bounds`) hold at most ``micro_batch`` sequences and
    keep their [S, n, T, T] attention buffers cache-sized; with ``icl`` they hold sequences of similar
    in-context counts, each chunk padded to its own max.
    ``parts`` > 1 deals the chunks out to that many single-threaded parts, all but the first in
    forked child processes (:func:`~assocmem.training.forked_map`; Linux), and adds up their gradients:
    the same gradient up to the order of the float sums."""
    S, B, T = x.shape
    ic = outs >= 2
    n_ic = ic.sum((1, 2)).clamp(min=1).float()                              # [S]
    keys = ("loss_head", "acc_end") if loss == "icl" else ("loss_head", "acc_end", "loss_bigram", "acc_tot", "acc_start")
    counts = None
    if loss == "icl":                     # sequences sorted by their loss positions (max over the stack)
        n_q = ic.sum(-1).amax(0)
        order = torch.argsort(n_q, stable=True)
        counts = n_q[order].tolist()
    else:
        order = torch.arange(B, device=x.device)
    chunks = list(order.split(chunk_bounds(counts, B, micro_batch, S * T * T)))
    parts = min(parts, len(chunks) // 8) if CAN_FORK else 1     # a fork costs about a chunk: split big steps only

    def run(mine: list[torch.Tensor], child: bool = False):
        if child:
            for p in model.parameters():
                p.grad = None
        sums = {k: torch.zeros(S, device=x.device) for k in keys + ("loss",)}
        w_sum = {k: torch.zeros(S, device=x.device) for k in keys}
        for idx in mine:
            _chunk_backward(model, x[:, idx], y[:, idx], outs[:, idx], loss, n_ic, B * T, sums, w_sum)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None} if child else None
        return sums, w_sum, grads

    if parts < 2:
        sums, w_sum, _ = run(chunks)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # dealt in snake order (0, 1, .., p-1, p-1, .., 0, ..): chunks come sorted by size
            deal = [[c for j, c in enumerate(chunks) if min(j % (2 * parts), 2 * parts - 1 - j % (2 * parts)) == i]
                    for i in range(parts)]
            (sums, w_sum, _), *kids = forked_map(lambda job: run(*job), [(d, i > 0) for i, d in enumerate(deal)])
        finally:
            torch.set_num_threads(threads)
        params = dict(model.named_parameters())
        for k_sums, k_w, k_grads in kids:
            for k in sums:
                sums[k] += k_sums[k]
            for k in w_sum:
                w_sum[k] += k_w[k]
            for n, g in k_grads.items():
                p = params[n]
                p.grad = g if p.grad is None else p.grad.add_(g)
    out = {k: sums[k] / w_sum[k].clamp(min=1) for k in keys}
    out["loss"] = sums["loss"]
    return out


CHUNK_ELEMENTS = 2 ** 20      # attention entries S n T^2 per chunk: 4 MB fp32 buffers stay in cache


def chunk_bounds(counts: list[int] | None, B: int, micro_batch: int, per_seq: int) -> list[int]:
    """Sizes of consecutive chunks over B sequences for :func:`chunked_step`.

    A chunk holds at most ``micro_batch`` sequences and at most CHUNK_ELEMENTS / ``per_seq`` (the
    attention entries of one sequence across the stack), at least one. With ``counts`` (the sorted
    numbers of loss positions, ascending) a chunk also ends before a sequence with more than
    2 q + 16 of them, q the chunk's first count: padding every sequence to the chunk's max then
    wastes at most about half of layer 2's work, and the rare trigger cycles (~T loss positions) no
    longer inflate a whole chunk of ordinary sequences."""
    cap = max(1, min(micro_batch, CHUNK_ELEMENTS // per_seq))
    sizes, n, first = [], 0, 0
    for i in range(B):
        if n and (n == cap or (counts is not None and counts[i] > 2 * first + 16)):
            sizes.append(n)
            n = 0
        if n == 0 and counts is not None:
            first = counts[i]
        n += 1
    return sizes + [n]


def _chunk_backward(model: SimplifiedInduction, xs, ys, os_, loss: str, n_ic, n_all: int, sums, w_sum) -> None:
    """One chunk of :func:`chunked_step`: backward of its share of the loss, statistics added to sums."""
    if loss == "icl":
        qpos, valid = loss_positions(os_)
        yq = torch.gather(ys, 2, qpos)
        lg = loss_logits(model, xs, qpos)
        ce = F.cross_entropy(lg.flatten(0, 2), yq.flatten(), reduction="none").view(yq.shape)
        w = valid.float()
        hit = (lg.detach().argmax(-1) == yq).float()
        parts = {"loss_head": (ce.detach(), w), "acc_end": (hit, w)}
        total = (ce * w).sum((1, 2)) / n_ic
    else:
        lg = loss_logits(model, xs)
        ce = F.cross_entropy(lg.flatten(0, 2), ys.flatten(), reduction="none").view(ys.shape)
        hit = (lg.detach().argmax(-1) == ys).float()
        parts = stat_parts(ce.detach(), hit, os_)
        total = ce.sum((1, 2)) / n_all
    for k, (v, m) in parts.items():
        sums[k] += (v * m).sum((1, 2))
        w_sum[k] += m.sum((1, 2))
    sums["loss"] += total.detach()
    total.sum().backward()
