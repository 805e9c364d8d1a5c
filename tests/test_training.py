import pytest
import torch

from assocmem.config import build
from assocmem.training import OptimConfig, make_optimizer


@pytest.mark.parametrize("name,extra", [("adamw", {}), ("adam", {"weight_decay": 0.05}),
                                        ("sgd", {"momentum": 0.9, "weight_decay": 1e-4}),
                                        ("sgd", {"momentum": 0.0, "weight_decay": 0.0})])
def test_optimizer_matches_torch_optim(name, extra):
    cfg = build(OptimConfig, {"name": name, "lr": 0.03, **extra})
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 5, 4, generator=g), torch.randn(3, 7, generator=g)]
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = make_optimizer(ours, cfg)
    if name == "adamw":
        topt = torch.optim.AdamW(ref, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif name == "adam":
        topt = torch.optim.Adam(ref, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        topt = torch.optim.SGD(ref, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for step in range(25):
        target = torch.randn(3, 5, 4, generator=g)
        for params, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            loss = ((params[0] - target) ** 2).sum() + (params[1].sin() * params[0].sum((1, 2))[:, None]).sum()
            loss.backward()
            o.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)                   # the same float operations in the same order


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_lr_groups_and_skipped_params_match_torch_optim(name):
    # the induction runner's use: a parameter group with its own lr (b_rel), and a matrix frozen for
    # the first steps by leaving its grad None, which torch.optim skips with its own step count
    cfg = build(OptimConfig, {"name": name, "lr": 0.02, "weight_decay": 1e-3, "momentum": 0.9})
    g = torch.Generator().manual_seed(1)
    init = {"W": torch.randn(2, 4, 4, generator=g), "b_rel": torch.randn(2, 6, generator=g)}
    ours = {k: v.clone().requires_grad_() for k, v in init.items()}
    ref = {k: v.clone().requires_grad_() for k, v in init.items()}
    opt = make_optimizer(ours, cfg, lr_mult={"b_rel": 10.0})
    groups = [{"params": [ref["W"]]}, {"params": [ref["b_rel"]], "lr": cfg.lr * 10.0}]
    topt = (torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            if name == "adamw" else torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
    for step in range(12):
        for params, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            (params["W"].tanh().sum((1, 2)) * params["b_rel"].cos().sum(1)).sum().backward()
            if step < 5:
                params["W"].grad = None            # frozen until step 5
            o.step()
    for k in init:
        assert torch.equal(ours[k], ref[k]), k
    assert opt.t == [7, 12]                        # W took 7 steps, b_rel 12


def test_masked_step_moves_only_active_members_and_unmasked_rows():
    # the geometric runner's use: member i stops for good once it meets its stopping rule, and
    # rows under a 0 mask (frozen embeddings) never move; everything else is torch's AdamW
    cfg = build(OptimConfig, {"name": "adamw", "lr": 0.05, "weight_decay": 0.01})
    g = torch.Generator().manual_seed(2)
    init = torch.randn(2, 5, 3, generator=g)
    grads = [torch.randn(2, 5, 3, generator=g) for _ in range(6)]
    row_mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])[:, None]     # row 2 frozen
    p = init.clone().requires_grad_()
    opt = make_optimizer({"p": p}, cfg)
    seen = []
    for t, gr in enumerate(grads):
        p.grad = gr.clone()
        opt.step(torch.tensor([True, t < 2]), {"p": row_mask})   # member 1 stops after two steps
        seen.append(p.detach().clone())
    for member, n_steps in ((0, 6), (1, 2)):
        ref = torch.nn.Parameter(init[member].clone())
        topt = torch.optim.AdamW([ref], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        for gr in grads[:n_steps]:
            ref.grad = gr[member].clone()
            topt.step()
        moved = torch.tensor([0, 1, 3, 4])
        assert torch.equal(p[member, moved].detach(), ref.detach()[moved])
        assert torch.equal(seen[n_steps - 1][member], p[member].detach())   # no change once stopped
    assert torch.equal(p[:, 2].detach(), init[:, 2])                        # the masked row never moved


def test_blas_matmul_equals_torch_with_and_without_autograd(monkeypatch):
    from assocmem import blas
    monkeypatch.setattr(blas, "_route", "numpy")              # whichever route this machine measured faster
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 65, 40, generator=g), torch.randn(3, 64, 40, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(1)                                   # the numpy route is single-threaded only
    try:
        assert blas._numpy_ok(a, b)
        torch.testing.assert_close(blas.matmul(a, b.transpose(1, 2)), a @ b.transpose(1, 2), atol=1e-5, rtol=1e-5)
        ours = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        ref = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        w = torch.randn(3, 65, 64, generator=g)
        (blas.matmul(ours[0], ours[1].transpose(1, 2)) * w).sum().backward()
        ((ref[0] @ ref[1].transpose(1, 2)) * w).sum().backward()
        for x, y in zip(ours, ref):
            torch.testing.assert_close(x.grad, y.grad, atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(before)
    if before > 1:
        assert not blas._numpy_ok(a, b)


def test_forked_call_returns_results_and_raises_child_errors():
    from assocmem.training import CAN_FORK, ForkedCall
    if not CAN_FORK:
        pytest.skip("fork is used on Linux only")
    assert ForkedCall(lambda n: torch.arange(n) * 2, 5).result().tolist() == [0, 2, 4, 6, 8]

    def boom(_):
        raise ValueError("bad member")
    with pytest.raises(RuntimeError, match="ValueError: bad member"):
        ForkedCall(boom, None).result()


def test_train_loop_runs_hooks_before_updates_and_stops_on_request():
    from assocmem.training import STOP, on_step, train_loop
    events, reported = [], []

    def step(s):
        events.append(("update", s))
        return torch.tensor([float(s)])

    with on_step(lambda s, total, values: reported.append((s, total))):
        n = train_loop(5, step, [(2, lambda s: events.append(("eval", s))), (0, lambda s: events.append(("end", s)))])
    assert n == 5
    assert events == [("eval", 0), ("update", 0), ("update", 1), ("eval", 2), ("update", 2), ("update", 3),
                      ("eval", 4), ("update", 4), ("eval", 5), ("end", 5)]
    assert reported == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    # a step that asks to stop: no update reported for it, no last-step hooks
    events.clear()
    n = train_loop(5, lambda s: STOP if s == 3 else step(s), [(0, lambda s: events.append(("end", s)))])
    assert n == 3 and events == [("update", 0), ("update", 1), ("update", 2)]
