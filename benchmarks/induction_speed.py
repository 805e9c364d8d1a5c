"""Speed of one training step (forward + backward) of the simplified induction model, spec defaults
(K = 5 fixed triggers, in-context loss, d = 256, T = 256, N = 65):

  fast      ``runners.induction_step.chunked_step``: per-step tables, layer-1 scores by gathers, layer 2
            only at the loss positions in two position blocks and without any [T, d] activation
            (``models.induction_fast``), micro-batches of similar in-context counts, dealt out to
            --parts single-threaded forked processes (default: one per thread, as in training)
  shortcut  ``SimplifiedInduction.forward(z, qpos)`` on the whole batch (frozen tables pushed through
            the maps once, layer 2 at the padded loss positions)
  naive     ``SimplifiedInduction.naive_forward`` (all positions, einsum reference)

    nice -n 19 .venv/bin/python benchmarks/induction_speed.py [--batch 512] [--threads 1] [--modes fast,naive] [--flops]

Prints wall and CPU seconds per step (best of --reps after one warm-up step) and the load average;
with --flops first the GFLOP per step of each mode, counted from the profiler's records of the matrix
products that run (``counted_gflop``) and, for fast, from the formula of ``fast_gflop``.

GFLOP per step at the defaults (batch of seed 0; 2 FLOP per multiply-add): fast 79.9 counted (80.0 by
the formula; the fast path before 2026-12-06: 105.8), naive 335.2. Timings (``--threads 2 --modes
fast,naive``, best of 3, idle machine): 2026-12-06 fast 0.76-0.80 s, naive 3.01-3.06 s (3.8-4.0x;
the 2026-11-24 fast path 0.89 s in the same minutes); 2026-11-24 fast 0.84-0.91 s, naive 2.91 s (3.2x).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from assocmem.models.induction import SimplifiedInduction
from assocmem.runners.induction_step import (POSITION_BLOCKS, chunk_bounds, chunked_step,
                                             loss_positions)
from assocmem.tasks.induction import TriggerBigram, load_stats


def fast_gflop(outs: torch.Tensor, micro_batch: int, d: int, N: int) -> float:
    """GFLOP (2 per multiply-add) of the matrix products of one ``chunked_step`` (forward + backward,
    in-context loss, one member), chunked and blocked as the step does. Per sequence of a chunk
    with prefix T (its last query) and query blocks j (Q_j padded queries, prefix L_j, R_j = N + L_j):

        3 T^2 N + sum_j Q_j (3 R_j (d+N) + 4 R_j d + 2 L_j^2 + T^2 + 3 L_j N)

    (see ``models.induction_fast``), plus the per-step tables with R = N + T_max and their backward:
    3 (R d^2 + R^2 d) for K = c F W_K1 F^T, 3 (2R d (d+N)) for [F; G] [c W_K2 | U_res^T], 3 (2R d N)
    for [F; G] U_att^T."""
    S, B, T = outs.shape
    n_q = (outs >= 2).sum(-1).amax(0)
    order = torch.argsort(n_q, stable=True)
    mac, start = 0, 0
    for n in chunk_bounds(n_q[order].tolist(), B, micro_batch, S * T * T):
        blocks, _ = loss_positions(outs[:, order[start:start + n]], POSITION_BLOCKS)
        start += n
        Ls = [int(q.max()) + 1 for q in blocks]
        Tc = max(Ls)
        per_seq = 3 * Tc * Tc * N + sum(q.shape[-1] * (3 * (N + L) * (d + N) + 4 * (N + L) * d + 2 * L * L + Tc * Tc
                                                       + 3 * L * N) for q, L in zip(blocks, Ls))
        mac += n * per_seq
    R = N + T
    mac += 3 * (R * d * d + R * R * d) + 3 * 2 * R * d * (d + N) + 3 * 2 * R * d * N
    return 2 * mac / 1e9


GEMMS = ("aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mm", "aten::addmm", "aten::addmm_")


def counted_gflop(fn) -> float:
    """GFLOP of the matrix products ``fn()`` runs, read from the profiler's records of the outermost
    bmm / baddbmm / mm / addmm calls (in-place variants included, which torch.utils.flop_counter
    misses; a batch-1 baddbmm_ runs an addmm_ inside, counted once)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    total = 0
    for e in prof.events():
        if e.name not in GEMMS:
            continue
        p = e.cpu_parent
        while p is not None and p.name not in GEMMS:
            p = p.cpu_parent
        if p is not None:
            continue
        sh = [list(x) for x in e.input_shapes if x]
        if e.name == "aten::bmm":
            total += 2 * sh[0][0] * sh[0][1] * sh[0][2] * sh[1][2]
        elif e.name.startswith("aten::baddbmm"):
            total += 2 * sh[1][0] * sh[1][1] * sh[1][2] * sh[2][2]
        elif e.name == "aten::mm":
            total += 2 * sh[0][0] * sh[0][1] * sh[1][1]
        else:
            total += 2 * sh[1][0] * sh[1][1] * sh[2][1]
    return total / 1e9


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (the forked parts of a step)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--parts", type=int, help="forked parts of a step (default: --threads)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="fast,shortcut")
    ap.add_argument("--flops", action="store_true", help="also count the GFLOP per step of each mode")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = TriggerBigram(load_stats(), a.T, 5, True)
    t0 = time.perf_counter()
    b = ds.sample(a.batch, torch.Generator().manual_seed(0))
    print(f"data: {time.perf_counter() - t0:.2f} s per batch of {a.batch}")
    m = SimplifiedInduction([torch.Generator().manual_seed(0)], 65, a.d, max(a.T, 1024))
    x, y, outs = b.x[None], b.y[None], b.outs[None]

    def fast():
        chunked_step(m, x, y, outs, "icl", a.micro_batch, a.parts or a.threads)

    def shortcut():
        (qpos,), valid = loss_positions(outs)
        lg = m(x, qpos)
        yq = torch.gather(y, 2, qpos)
        ce = F.cross_entropy(lg.flatten(0, 2), yq.flatten(), reduction="none")
        ((ce * valid.flatten()).sum() / valid.sum()).backward()

    def naive():
        lg = m.naive_forward(x)
        mask = (outs >= 2).flatten()
        F.cross_entropy(lg.flatten(0, 2)[mask], y.flatten()[mask]).backward()

    for name in a.modes.split(",") if a.flops else ():
        fn = {"fast": fast, "shortcut": shortcut, "naive": naive}[name]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)       # one process, so that the profiler sees every product
        parts, a.parts = a.parts, 1
        m.zero_grad(set_to_none=True)
        got = counted_gflop(fn)
        a.parts = parts
        torch.set_num_threads(threads)
        formula = f", formula {fast_gflop(outs, a.micro_batch, a.d, 65):.1f}" if name == "fast" else ""
        print(f"{name:9s} {got:6.1f} GFLOP per step counted{formula}", flush=True)
    for name in a.modes.split(","):
        fn = {"fast": fast, "shortcut": shortcut, "naive": naive}[name]
        walls, cpus = [], []
        for i in range(a.reps + 1):
            m.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), _cpu()
            fn()
            if i:   # first call is a warm-up
                walls.append(time.perf_counter() - t0)
                cpus.append(_cpu() - c0)
        print(f"{name:9s} {min(walls):6.2f} s wall, {min(cpus):6.2f} s CPU per step "
              f"(batch {a.batch}, T {a.T}, d {a.d}, {a.threads} thread(s), load average {os.getloadavg()[0]:.2f})",
              flush=True)


if __name__ == "__main__":
    main()
