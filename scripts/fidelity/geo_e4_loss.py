"""E4 within-relation linearity R^2: model stopped at 100% accuracy (the report's) vs trained on to loss 1e-3."""
import numpy as np, torch
from assocmem.experiments.geometric_common import make_cfg
from assocmem.registry import get_task
from assocmem.analysis import geometric as ga
torch.set_num_threads(1)
task = get_task("geometric")
for label, extra in (("init 0.01", {"model.emb_std": 0.01}), ("init 1/sqrt(d)", {})):
    for stop in ("acc", "loss"):
        cfgs = [make_cfg(**{"task.N": 512, "task.R": 4, "model.d_model": 32, "optim.lr": 1e-2, "optim.patience": 0 if stop == "loss" else 400,
                            "optim.max_steps": 1500 if stop == "acc" else 6000, "optim.stop": stop, "optim.stop_loss": 1e-3, **extra}, seed=s) for s in (0, 1)]
        res = task.run_stack(cfgs)
        lin = []
        for c, r in zip(cfgs, res):
            gt = ga.mlp_gating(r.weights, r.weights["bij"], gen=torch.Generator().manual_seed(c.seed))
            lin.append(np.mean(gt["linearity_r2"]))
        print(label, "stop", stop, "steps", [r.metrics["steps"] for r in res], "loss", [round(r.metrics["loss"], 5) for r in res],
              "acc", [r.metrics["accuracy"] for r in res], "linearity R2", [round(x, 3) for x in lin], flush=True)
