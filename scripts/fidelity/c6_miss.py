"""Where the calibrated construction misses at T = 256 (report's batch: fixed K=3, seed 5, 256 seqs)."""
import torch
from assocmem.tasks.induction import load_stats, TriggerBigram
from assocmem.theory.induction import build_amt
from assocmem.models.induction_fast import loss_logits
st = load_stats()
ds = TriggerBigram(st, 256, 3, True)
b = ds.sample(256, torch.Generator().manual_seed(5))
for pos in ("ape", "rel_bias"):
    m = build_amt(st.pi_b, pos=pos, key_tokens=ds.fixed)
    preds, ys, outs, ids, a2s = [], [], [], [], []
    for i in range(0, 256, 32):
        lg, hk = loss_logits(m, b.x[None, i:i+32], return_attn=True)
        preds.append(lg.argmax(-1)[0]); a2s.append(hk["attn2"][0])
    pred = torch.cat(preds); a2 = torch.cat(a2s)
    ic = b.outs >= 2
    miss = ic & (pred != b.y)
    glob = st.pi_b[b.x].argmax(-1)
    T = b.x.shape[1]
    matched = torch.nn.functional.pad(b.x[:, :-1], (1, 0), value=-1)[:, None, :] == b.x[:, :, None]
    mass = (a2 * matched).sum(-1)
    print(f"{pos}: in-context {int(ic.sum())}, misses {int(miss.sum())} ({1-float(miss.sum())/float(ic.sum()):.5f} acc)")
    for c in (2, 3, 4):
        sel = (b.outs == c) if c < 4 else (b.outs >= 4)
        print(f"  outs {'=' if c<4 else '>='}{c}: acc {1-float((miss&sel).sum())/max(1,float((ic&sel).sum())):.4f} ({int((ic&sel).sum())} pos)")
    print(f"  misses predicting the global favourite argmax pi_b(.|q): {int((miss & (pred == glob)).sum())}; "
          f"mean layer-2 mass on matched keys at misses {float(mass[miss].mean()):.3f} vs hits {float(mass[ic & ~miss].mean()):.3f}")
    tt = torch.arange(T).expand_as(b.x)
    print(f"  misses at t < 64: {int((miss & (tt < 64)).sum())}, t >= 64: {int((miss & (tt >= 64)).sum())}; "
          f"acc at t<64 {1-float((miss&(tt<64)).sum())/float((ic&(tt<64)).sum()):.4f}")
