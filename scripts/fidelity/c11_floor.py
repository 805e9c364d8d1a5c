"""C-11: how low can loss_bigram go for the trained Fig. 4 model (K=5 random, linear W_F, full loss)?
Keep every weight of the stored run, refit only W_F (Adam, full batch, N fixed sequences) on the
bigram loss alone (outs = 0 positions), then evaluate on 256 fresh sequences. Variants: the trained
model as stored; W_F refit; W_F refit with layer 2 switched off (W_O2 = 0); W_F refit with neither
layer 2 nor positions. Usage: c11_floor.py STORE RUN_ID N_TRAIN"""
import sys, json, torch
import torch.nn.functional as F
from assocmem.config import build
from assocmem.runners.induction import InductionConfig, load_model
from assocmem.store import RunStore
from assocmem.tasks.induction import load_stats, TriggerBigram
torch.manual_seed(0)
store, rid = RunStore(sys.argv[1]), sys.argv[2]
cfg = build(InductionConfig, json.load(open(f"{sys.argv[1]}/runs/{rid}/config.json"))["config"])
st = load_stats()
ds = TriggerBigram(st, cfg.task.T, cfg.task.K, cfg.task.fixed_triggers, outputs=cfg.task.outputs)
tr, te = ds.sample(int(sys.argv[3]), torch.Generator().manual_seed(11)), ds.sample(512, torch.Generator().manual_seed(12))
m0 = (ds.pi_b[te.x, te.y].log())[te.outs == 0].mean()
print(f"d={cfg.model.d_model} T={cfg.task.T}: true-bigram CE at outs=0 on the test sequences {-float(m0):.3f}")

def lb(m, b):
    with torch.no_grad():
        lg = m(b.x[None])[0]
    msk = b.outs == 0
    return float(F.cross_entropy(lg[msk], b.y[msk]))

def refit(m, steps=400):
    W = m.W_F.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=1e-2)
    msk = tr.outs == 0
    for i in range(steps):
        m.W_F = W
        lg = m(tr.x[None])[0]
        loss = F.cross_entropy(lg[msk], tr.y[msk])
        opt.zero_grad(); loss.backward(); opt.step()
    m.W_F = W.detach()
    return float(loss.detach())

m = load_model(cfg, store.load_weights(rid))
for p in m.parameters():
    p.requires_grad_(False)
print(f"stored model: loss_bigram {lb(m, te):.3f}")
del m.W_F
m.W_F = load_model(cfg, store.load_weights(rid)).W_F.detach()
print(f"W_F refit (rest as trained): train {refit(m):.3f}, test {lb(m, te):.3f}")
m.W_O2.data.zero_()
print(f"W_F refit, layer 2 off: train {refit(m):.3f}, test {lb(m, te):.3f}")
m.P.zero_()
print(f"W_F refit, layer 2 off, no positions: train {refit(m):.3f}, test {lb(m, te):.3f}")
