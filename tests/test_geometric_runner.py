"""Runner for geometric recall: stacking equals single runs, masked AdamW equals torch AdamW, CLI."""
import json

import pytest
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


def test_parallel_parts_equal_one_stack(monkeypatch):
    """run_stack on two threads trains the stack as two parts, one in a forked process; the members
    equal the whole stack's (trained in this process) in steps, metrics and weights."""
    from assocmem import training
    cs = [cfg(s, optim__max_steps=120, model__d_model=12) for s in (0, 1, 2)]
    calls = []
    real = training.forked_map
    monkeypatch.setattr(training, "forked_map", lambda fn, items: calls.append(len(items)) or real(fn, items))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parts = G.run_stack(cs)
        assert calls == [2] or not training.CAN_FORK
        whole = G._run_stack(cs)
    finally:
        torch.set_num_threads(threads)
    for p, w in zip(parts, whole):
        assert p.metrics["steps"] == w.metrics["steps"] and p.metrics["loss"] == pytest.approx(w.metrics["loss"], abs=1e-6)
        for name in w.weights:
            assert torch.allclose(p.weights[name].float(), w.weights[name].float(), atol=1e-6), name
    assert not torch.equal(parts[0].weights["W_E"], parts[1].weights["W_E"])


def test_early_stopped_member_is_frozen():
    # seed-wise stopping: instances stop at different steps, each equals its own single run
    cs = [cfg(s, optim__max_steps=400, model__d_model=16) for s in (0, 1)]
    stacked = G.run_stack(cs)
    for c, r in zip(cs, stacked):
        single = G.run_stack([c])[0]
        assert r.metrics["steps"] == single.metrics["steps"]
        assert torch.allclose(r.weights["W_E"], single.weights["W_E"], atol=1e-4)
    assert all(r.metrics["accuracy"] == 1.0 for r in stacked)


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


def test_fused_unembed_cross_entropy_equals_plain():
    """Loss, accuracy and gradients of the fused path equal F.cross_entropy on explicit logits."""
    from assocmem.models.geometric import unembed_cross_entropy
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    U = torch.randn(2, 11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, 11, (2, 7), generator=g)
    tgt[0, 3] = -1                                                      # ignored row
    w = torch.randn(2, 7, generator=g, dtype=torch.float64)
    loss, correct = unembed_cross_entropy(z, U, tgt)
    (loss * w).sum().backward()
    gz, gU = z.grad.clone(), U.grad.clone()
    z.grad = U.grad = None
    logits = z @ U.transpose(1, 2)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tgt.reshape(-1).clamp_min(0),
                                            reduction="none").view(2, 7) * (tgt >= 0)
    (ref * w).sum().backward()
    assert torch.allclose(loss, ref) and torch.equal(correct, logits.argmax(-1) == tgt)
    assert torch.allclose(gz, z.grad) and torch.allclose(gU, U.grad)


def test_fused_unembed_cross_entropy_far_logits_and_ties():
    """fp32 logits spread over hundreds of units (most shifted logits under EXP_FLOOR) give the plain
    loss and gradients to fp32 rounding, and tied maxima count as argmax counts them (first index)."""
    from assocmem.models.geometric import EXP_FLOOR, unembed_cross_entropy
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 64, 6, generator=g) * 30).requires_grad_()
    U = torch.randn(2, 40, 6, generator=g).requires_grad_()
    tgt = torch.randint(0, 40, (2, 64), generator=g)
    with torch.no_grad():                       # rows 0-3: answers 5 and 9 tie for the maximum
        U[0, 5] = U[0, 9] = torch.tensor([10.0, 0, 0, 0, 0, 0])
        z[0, :4] = U[0, 5] * 5
    tgt[0, :4] = torch.tensor([5, 9, 5, 9])
    logits = (z @ U.transpose(1, 2)).detach()
    assert ((logits - logits.amax(-1, keepdim=True)) < EXP_FLOOR).float().mean() > 0.5
    loss, correct = unembed_cross_entropy(z, U, tgt)
    loss.sum().backward()
    gz, gU = z.grad.clone(), U.grad.clone()
    z.grad = U.grad = None
    ref = torch.nn.functional.cross_entropy((z @ U.transpose(1, 2)).reshape(-1, 40), tgt.reshape(-1),
                                            reduction="none").view(2, 64)
    ref.sum().backward()
    assert correct[0, :4].tolist() == [True, False, True, False]
    assert torch.equal(correct, logits.argmax(-1) == tgt)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gz, z.grad, rtol=1e-4, atol=1e-5) and torch.allclose(gU, U.grad, rtol=1e-4, atol=1e-4)


def test_fused_training_equals_plain_training():
    c = cfg(0, optim__max_steps=300, model__d_model=12, model__layernorm=True)
    data = G.make_data(c, c.seeds.resolve(0))
    out = []
    for fused in (True, False):
        model = G.build_model(c, 2, data)
        for i in range(2):
            model.init_instance(i, torch.Generator().manual_seed(i))
        model.double()   # float64, so the two summation orders agree to ~1e-12 even after Adam
        tr = G.train(model, data.tokens, data.targets[None].expand(2, -1, -1), data.out_pos, c.optim,
                     G.trainable_names(c.model), fused=fused)
        out.append((tr, model.W_E.detach().clone()))
    (a, Wa), (b, Wb) = out
    assert a["steps"] == b["steps"] and a["accuracy"] == b["accuracy"]
    assert max(a["accuracy"]) == 1.0
    assert torch.allclose(Wa, Wb, atol=1e-8)
