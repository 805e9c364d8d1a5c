"""Speed of one training step of the simplified induction model: shortcut forward (frozen tables,
layer 2 only at the in-context loss positions) vs the naive all-positions forward.

    .venv/bin/python benchmarks/induction_speed.py [--batch 32] [--T 256] [--d 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from assocmem.models.induction import SimplifiedInduction
from assocmem.runners.induction import loss_positions
from assocmem.tasks.induction import TriggerBigram, load_stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ds = TriggerBigram(load_stats(), a.T, 5, True)
    b = ds.sample(a.batch, torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(a.reps):
        ds.sample(a.batch, torch.Generator().manual_seed(0))
    print(f"data: {(time.perf_counter() - t0) / a.reps * 1e3:.1f} ms per batch")
    m = SimplifiedInduction([torch.Generator().manual_seed(0)], 65, a.d, a.T)
    x, y, outs = b.x[None], b.y[None], b.outs[None]
    qpos, valid = loss_positions(outs)
    for name in ("fast", "naive"):
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            if name == "fast":
                lg = m(x, qpos)
                yq = torch.gather(y, 2, qpos)
                loss = (F.cross_entropy(lg.flatten(0, 2), yq.flatten(), reduction="none") * valid.flatten()).sum() / valid.sum()
            else:
                lg = m.naive_forward(x)
                mask = (outs >= 2).flatten()
                loss = F.cross_entropy(lg.flatten(0, 2)[mask], y.flatten()[mask])
            m.zero_grad()
            loss.backward()
            times.append(time.perf_counter() - t0)
        print(f"{name}: {min(times) * 1e3:.0f} ms per step (batch {a.batch}, T {a.T}, d {a.d}, {a.threads} thread)")


if __name__ == "__main__":
    main()
