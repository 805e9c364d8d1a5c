"""Experiment helpers: bisection over a grid reuses the store and finds the threshold."""
import dataclasses

import pandas as pd
import pytest

from assocmem.experiments import geometric as ge
from assocmem.experiments import geometric_plots as gp
from assocmem.store import RunStore
from assocmem.sweep import LocalBackend


@pytest.mark.slow
def test_bisect_finds_monotone_threshold(tmp_path):
    store = RunStore(tmp_path)
    cells = {"tiny": lambda d: [ge.make_cfg(**{"task.N": 16, "task.R": 2, "model.d_model": d, "optim.lr": 0.01,
                                                "optim.max_steps": 200, "optim.patience": 50}, seed=0)]}
    grid = (1, 4, 16, 64)
    res = ge.bisect(store, cells, grid, LocalBackend(1), False, "test")
    d = res["tiny"]
    assert d is not None and d <= 64
    recs = store.table("geometric")
    ok = recs.set_index("model.d_model")["success"]
    assert ok[d] == 1.0 and all(ok[x] == 0.0 for x in ok.index if x < d)
    n = len(recs)
    assert ge.bisect(store, cells, grid, LocalBackend(1), False, "test") == res  # reuses finished runs
    assert len(store.table("geometric")) == n
    # a search started from a guess (below / at or above the threshold) walks to the same threshold
    for g in (1, 64):
        assert ge.bisect(store, cells, grid, LocalBackend(1), False, "test", guess={"tiny": g}) == res


def test_plots_return_figures(tmp_path):
    df = pd.DataFrame({"N": [64, 128, 64, 128], "R": [2, 2, 4, 4], "dstar": [4, 6, 8, 12]})
    paths = ge.plots.save(gp.dstar_vs_logN(df, 0.5, 0.0), tmp_path, "geo_e1_dstar")
    assert all(p.exists() for p in paths)


def test_e6_scales_have_a_verdict_cell():
    """Every reproduce scale runs E6 at some R where the growth check is a verdict (not only trend-only cells),
    with k = 1 and a k >= 3 so the R^(k-1) separation of the constructions is at least 9."""
    from assocmem.experiments.geometric_common import E6_MIN_R, SCALES
    for name, sc in SCALES.items():
        assert max(sc.e6_R) >= E6_MIN_R, name
        assert min(sc.e6_k) == 1 and max(sc.e6_k) >= 3, name
        assert max(sc.e6_R) ** (max(sc.e6_k) - 1) >= 9, name


def test_e6_k1_cells_share_runs():
    """At k = 1 CoT and no CoT are the same task (identical tokens and targets), so the two E6 cells
    name the same runs; at k > 1 they differ."""
    import torch

    from assocmem.experiments.geometric_common import SCALES
    from assocmem.experiments.geometric_learned import e6_configs
    from assocmem.registry import get_task, run_id
    from assocmem.runners.geometric import make_data
    task, sc = get_task("geometric"), SCALES["quick"]
    ids = {(k, cot): [run_id(task, c) for c in e6_configs(sc, 3, k, cot, 8)] for k in (1, 2) for cot in (True, False)}
    assert ids[(1, True)] == ids[(1, False)]
    assert not set(ids[(2, True)]) & set(ids[(2, False)])
    c = e6_configs(sc, 3, 1, False, 8)[0]
    seeds = c.seeds.resolve(c.seed)
    a, b = make_data(c, seeds), make_data(dataclasses.replace(c, task=dataclasses.replace(c.task, cot=True)), seeds)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets) and a.out_pos == b.out_pos
