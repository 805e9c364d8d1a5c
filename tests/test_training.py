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
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


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
