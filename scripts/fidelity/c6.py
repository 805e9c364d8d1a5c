"""C-6 law: the calibrated construction's acc_end at T = 256, unrounded, and where the misses are.
Same batch as the report (fixed K=3, seed 5, n seqs), then other seeds."""
import sys, torch
from assocmem.tasks.induction import load_stats, TriggerBigram
from assocmem.theory.induction import build_amt
from assocmem.runners.induction_probes import batch_metrics
st = load_stats()
ds = TriggerBigram(st, 256, 3, True)
n = int(sys.argv[1])
seeds = [int(s) for s in sys.argv[2].split(",")]
models = {lab: build_amt(st.pi_b, pos=pos, key_tokens=ds.fixed) for pos, lab in (("ape", "APE"), ("rel_bias", "RPE"))}
for sd in seeds:
    b = ds.sample(n, torch.Generator().manual_seed(sd))
    ch = b.chained()
    for lab, m in models.items():
        r = batch_metrics(m, b.x[None], b.y[None], b.outs[None])
        rk = batch_metrics(m, b.x[None, ~ch], b.y[None, ~ch], b.outs[None, ~ch])
        rc = batch_metrics(m, b.x[None, ch], b.y[None, ch], b.outs[None, ch]) if ch.any() else {}
        npos = int((b.outs >= 2).sum()); npos_ch = int((b.outs[ch] >= 2).sum())
        print(f"seed {sd} n={n} {lab}: acc_end {float(r['acc_end']):.5f} over {npos} in-context positions "
              f"({npos_ch} in {int(ch.sum())} chained seqs); non-chained {float(rk['acc_end']):.5f}, "
              f"chained {float(rc.get('acc_end', float('nan'))):.5f}; prev-tok {float(r['prev_tok_all']):.4f}", flush=True)
