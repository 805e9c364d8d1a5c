import torch
from assocmem.experiments.geometric_common import make_cfg
from assocmem.registry import get_task
from assocmem.analysis import geometric as ga
from assocmem.tasks.geometric import single_hop
torch.set_num_threads(1)
task = get_task("geometric")
cfg = make_cfg(**{"task.N": 512, "task.R": 4, "model.d_model": 32, "optim.lr": 1e-2, "optim.patience": 400, "optim.max_steps": 1500, "model.emb_std": 0.01}, seed=0)
W = task.run_stack([cfg])[0].weights
bij = W["bij"]; R, N = bij.shape
model = ga._model(W, False)
data = single_hop(bij)
x = model.embed(data.tokens); a, _ = model.attend(x, 1, 2)
h = model.mlp_hidden(x[:, :, 1:2] + a)[0, :, 0]
p = (h > 0).float().view(R, N, -1).mean(1)       # [R, m] P(active | r)
alive = p.sum(0) > 0
mixed = ((p > 0.05) & (p < 0.95))[:, alive].float().mean()
print("units", h.shape[1], "alive", int(alive.sum()), "share of (relation, unit) pairs gated on by some subjects and off by others (0.05<p<0.95):", round(float(mixed), 3))
print("per relation R2", [round(v, 3) for v in ga.mlp_gating(W, bij, gen=torch.Generator().manual_seed(0))["linearity_r2"]])
