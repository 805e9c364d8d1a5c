"""C-2: our generator's outs>=2 share over many 2048-sequence batches (T = 256)."""
import sys, math, torch
from assocmem.tasks.induction import load_stats, TriggerBigram
st = load_stats()
K, fixed, nb = int(sys.argv[1]), sys.argv[2] == "fixed", int(sys.argv[3])
ds = TriggerBigram(st, 256, K, fixed)
print("triggers", [st.chars[i] for i in ds.fixed.tolist()] if fixed else "random")
shares, s1s, chained = [], [], []
for b in range(nb):
    bt = ds.sample(2048, torch.Generator().manual_seed(50_000 + b))
    shares.append(float((bt.outs >= 2).float().mean())); s1s.append(float((bt.outs >= 1).float().mean()))
    chained.append(float(bt.chained().float().mean()))
s = torch.tensor(shares, dtype=torch.float64)
print(f"K={K} {'fixed' if fixed else 'random'}: {nb} batches x 2048 = {nb*2048} seqs")
print(f"share outs>=1 {sum(s1s)/nb:.4f}; share outs>=2 mean {s.mean():.4f}, sd per 2048-batch {s.std():.4f}, "
      f"se of mean {s.std()/math.sqrt(nb):.4f}; share of chained seqs {sum(chained)/nb:.4f}")
print("per-batch:", " ".join(f"{x:.4f}" for x in shares))
