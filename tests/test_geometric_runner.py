"""Runner for geometric recall: stacking equals single runs, masked AdamW equals torch AdamW, CLI."""
import json

import torch

from assocmem import cli
from assocmem.config import build
from assocmem.registry import get_task
from assocmem.runners import geometric as G


def cfg(seed=0, **kw):
    base = {"task": {"N": 32, "R": 2}, "model": {"d_model": 8}, "optim": {"max_steps": 60, "lr": 1e-2}}
    for key, v in kw.items():
        grp, leaf = key.split("__")
        base.setdefault(grp, {})[leaf] = v
    return build(G.GeoConfig, {**base, "seed": seed})


def test_member_of_stack_equals_single_run():
    stacked = G.run_stack([cfg(0), cfg(1), cfg(2)])
    single = G.run_stack([cfg(1)])[0]
    m = stacked[1]
    assert m.metrics["steps"] == single.metrics["steps"]
    assert abs(m.metrics["accuracy"] - single.metrics["accuracy"]) < 1e-6
    for name, w in single.weights.items():
        assert torch.allclose(m.weights[name].float(), w.float(), atol=1e-4), name
    assert not torch.equal(stacked[0].weights["bij"], stacked[1].weights["bij"])  # seeds differ


def test_early_stopped_member_is_frozen():
    # seed-wise stopping: instances stop at different steps, each equals its own single run
    cs = [cfg(s, optim__max_steps=400, model__d_model=16) for s in (0, 1)]
    stacked = G.run_stack(cs)
    for c, r in zip(cs, stacked):
        single = G.run_stack([c])[0]
        assert r.metrics["steps"] == single.metrics["steps"]
        assert torch.allclose(r.weights["W_E"], single.weights["W_E"], atol=1e-4)
    assert all(r.metrics["accuracy"] == 1.0 for r in stacked)


def test_masked_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(2, 5, 3)
    grads = [torch.randn(2, 5, 3) for _ in range(4)]
    o = build(G.OptimCfg, {"lr": 0.01, "weight_decay": 0.01})
    p = p0.clone()
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    state = {}
    for t, g in enumerate(grads, 1):
        p.grad = g
        G.adamw_step({"p": p}, state, t, torch.tensor([True, True]), o)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(p, ref.detach(), atol=1e-6)


def test_cot_config_and_greedy_accuracy():
    r = G.run_stack([cfg(0, task__format="slots", task__k=2, task__cot=True, model__d_model=16,
                         optim__max_steps=30)])[0]
    assert 0.0 <= r.metrics["chain_accuracy"] <= r.metrics["accuracy"] + 1e-9 or r.metrics["chain_accuracy"] <= 1
    assert r.metrics["n_queries"] == 4 * 32


def test_cli_run_and_registry(tmp_path, capsys):
    assert get_task("geometric").config_cls is G.GeoConfig
    rc = cli.main(["run", "geometric", "task.N=32", "task.R=2", "model.d_model=16", "optim.max_steps=300",
                   "optim.lr=0.01", "seed=0", "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["status"] == "ok" and out["accuracy"] == 1.0
    rc = cli.main(["run", "geometric", "task.format=sr", "task.k=2", "--out", str(tmp_path)])
    assert rc == 2  # k > 1 needs the slots format


def test_device_field():
    """``device`` is validated against DEVICES; weights come back on the CPU; 'auto' on a CPU-only
    machine equals the cpu run (tests run on the CPU only)."""
    import dataclasses

    import pytest

    from assocmem.config import ConfigError
    assert G.GeoConfig().device == "cpu"
    with pytest.raises(ConfigError):
        build(G.GeoConfig, {"device": "tpu"})
    a = G.run_stack([cfg(0)])[0]
    assert a.weights["W_E"].device.type == "cpu"
    if not torch.cuda.is_available():
        b = G.run_stack([dataclasses.replace(cfg(0), device="auto")])[0]
        assert a.metrics["steps"] == b.metrics["steps"] and torch.equal(a.weights["W_E"], b.weights["W_E"])
