"""The training step of the simplified induction model: exact, micro-batched, optionally split over
forked single-threaded processes.

``chunked_step`` computes the gradient of the per-member mean loss over a whole batch [S,B,T] chunk by
chunk (``chunk_bounds`` cuts the chunks); with the in-context loss only the loss positions get
layer-2 work (``loss_positions``, in POSITION_BLOCKS blocks by position, each on its own prefix), and
each chunk is padded only to its own maximum. The fast path's per-step tables are built and
backpropagated once per step. Tested equal to one full-batch backward in tests/test_induction_fast.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.induction import SimplifiedInduction
from ..models.induction_fast import loss_logits, step_tables, supports_fast
from ..training import CAN_FORK, forked_map


POSITION_BLOCKS = 2   # query blocks by position: a block of early positions reads a short prefix


def loss_positions(outs: torch.Tensor, blocks: int = 1) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Query positions of outs >= 2 in ``blocks`` equal position ranges, each padded to its own
    max count: (qpos blocks [S,B,Q_j], valid [S,B,sum Q_j]). Padding entries point at position 0,
    so that a block's last query (its prefix length) is a real one."""
    S, B, T = outs.shape
    mask = outs >= 2
    pos = torch.arange(T, device=outs.device)
    qs, valid = [], []
    for j in range(blocks):
        mj = mask & (pos >= j * T // blocks) & (pos < (j + 1) * T // blocks)
        Q = int(mj.sum(-1).max())
        if Q == 0 and (qs or j < blocks - 1):
            continue
        idx = torch.argsort((~mj).to(torch.int8), dim=-1, stable=True)[..., :max(Q, 1)]
        v = torch.gather(mj, -1, idx)
        qs.append(torch.where(v, idx, 0))
        valid.append(v)
    return tuple(qs), torch.cat(valid, -1)


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
    # the fast path's per-step tables: built once, the chunks' gradients collect on detached copies,
    # one backward through the tables at the end
    tables = step_tables(model, T) if supports_fast(model) else None
    leaves = dict(model.named_parameters()) if tables is None else {
        k: v.detach().requires_grad_(v.requires_grad) for k, v in tables.items()}

    def run(mine: list[torch.Tensor], child: bool = False):
        if child:
            for p in leaves.values():
                p.grad = None
        sums = {k: torch.zeros(S, device=x.device) for k in keys + ("loss",)}
        w_sum = {k: torch.zeros(S, device=x.device) for k in keys}
        for idx in mine:
            _chunk_backward(model, x[:, idx], y[:, idx], outs[:, idx], loss, n_ic, B * T, sums, w_sum,
                            None if tables is None else leaves)
        grads = {n: p.grad for n, p in leaves.items() if p.grad is not None} if child else None
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
        for k_sums, k_w, k_grads in kids:
            for k in sums:
                sums[k] += k_sums[k]
            for k in w_sum:
                w_sum[k] += k_w[k]
            for n, g in k_grads.items():
                p = leaves[n]
                p.grad = g if p.grad is None else p.grad.add_(g)
    if tables is not None:
        done = [k for k, v in leaves.items() if v.grad is not None]
        torch.autograd.backward([tables[k] for k in done], [leaves[k].grad for k in done])
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


def _chunk_backward(model: SimplifiedInduction, xs, ys, os_, loss: str, n_ic, n_all: int, sums, w_sum,
                    tables: dict[str, torch.Tensor] | None) -> None:
    """One chunk of :func:`chunked_step`: backward of its share of the loss (into the tables' grads,
    with ``tables``), statistics added to sums."""
    if loss == "icl":
        qpos, valid = loss_positions(os_, POSITION_BLOCKS)
        yq = torch.gather(ys, 2, torch.cat(qpos, -1))
        lg = loss_logits(model, xs, qpos, tables=tables)
        ce = F.cross_entropy(lg.flatten(0, 2), yq.flatten(), reduction="none").view(yq.shape)
        w = valid.float()
        hit = (lg.detach().argmax(-1) == yq).float()
        parts = {"loss_head": (ce.detach(), w), "acc_end": (hit, w)}
        total = (ce * w).sum((1, 2)) / n_ic
    else:
        lg = loss_logits(model, xs, tables=tables)
        ce = F.cross_entropy(lg.flatten(0, 2), ys.flatten(), reduction="none").view(ys.shape)
        hit = (lg.detach().argmax(-1) == ys).float()
        parts = stat_parts(ce.detach(), hit, os_)
        total = ce.sum((1, 2)) / n_all
    for k, (v, m) in parts.items():
        sums[k] += (v * m).sum((1, 2))
        w_sum[k] += m.sum((1, 2))
    sums["loss"] += total.detach()
    total.sum().backward()
