"""Speed of one training step (forward + backward) of the simplified induction model, spec defaults
(K = 5 fixed triggers, in-context loss, d = 256, T = 256):

  fast      ``runners.induction_step.chunked_step``: table-based layer-1 scores, layer 2 only at the loss
            positions, output side folded into N = 65 dims, micro-batches of similar in-context counts,
            dealt out to --parts single-threaded forked processes (default: one per thread, as in training)
  shortcut  ``SimplifiedInduction.forward(z, qpos)`` on the whole batch (frozen tables pushed through
            the maps once, layer 2 at the padded loss positions)
  naive     ``SimplifiedInduction.naive_forward`` (all positions, einsum reference)

    nice -n 19 .venv/bin/python benchmarks/induction_speed.py [--batch 512] [--threads 1] [--modes fast,shortcut]

Prints wall and CPU seconds per step (best of --reps after one warm-up step) and the load average.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from assocmem.models.induction import SimplifiedInduction
from assocmem.runners.induction_step import chunked_step, loss_positions
from assocmem.tasks.induction import TriggerBigram, load_stats


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
        qpos, valid = loss_positions(outs)
        lg = m(x, qpos)
        yq = torch.gather(y, 2, qpos)
        ce = F.cross_entropy(lg.flatten(0, 2), yq.flatten(), reduction="none")
        ((ce * valid.flatten()).sum() / valid.sum()).backward()

    def naive():
        lg = m.naive_forward(x)
        mask = (outs >= 2).flatten()
        F.cross_entropy(lg.flatten(0, 2)[mask], y.flatten()[mask]).backward()

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
