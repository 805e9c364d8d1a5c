"""The LCA model: exact count path == plain path; stacked ensemble member == single run."""
import math

import pytest
import torch

from assocmem.config import replace
from assocmem.models.lca import LCAModel
from assocmem.registry import get_task
from assocmem.runners.lca import model_from_weights
from assocmem.tasks.lca import LCATask, counts

SPEC = get_task("lca")


def _model(S=2, m=4, d=8, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(S)]
    return LCAModel.init(S, 2 ** m + 1, d, gens, **kw)


@pytest.mark.parametrize("d", [12, 4])   # d = 4: the (a @ values) @ W_E^T order (2d < V+1); 12: via M
@pytest.mark.parametrize("kw", [{}, {"identity_W_V": True}, {"train_embeddings": False},
                                {"uniform_attention": True}, {"uniform_attention": True, "identity_W_V": True}])
def test_count_path_equals_plain_path_logits_and_grads(kw, d):
    torch.manual_seed(0)
    m, S = 4, 2
    model = _model(S, m, d, **kw)
    with torch.no_grad():   # make scores large enough that the max-subtraction matters
        if not kw.get("uniform_attention"):
            model.W_Q.mul_(3.0)
    task = LCATask(m, 12)
    g = torch.Generator().manual_seed(1)
    x = torch.stack([task.sample(32, g)[0] for _ in range(S)])
    t = torch.randint(2 ** m, (S, 32), generator=g)
    out = {}
    V = 2 ** m
    c = counts(x, V)   # keys restricted to the V real tokens, as in training
    for path in ("plain", "count", "count_trimmed", "count_by_hand"):
        model.zero_grad()
        if path == "count_by_hand":
            loss = model.count_loss_backward(c, x[..., -1], t).sum()
            logits = model.forward_counts(c, x[..., -1]).detach()
        else:
            logits = model.forward_counts(c, x[..., -1]) if path == "count_trimmed" else model(x, path)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none")
            loss = loss.view(S, -1).mean(1).sum()      # members' mean losses, summed (as in training)
            loss.backward()
        out[path] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                     loss.item())
    for path in ("count", "count_trimmed", "count_by_hand"):
        assert out[path][2] == pytest.approx(out["plain"][2], rel=1e-5)
        torch.testing.assert_close(out[path][0], out["plain"][0], atol=1e-5, rtol=1e-5)
        assert out[path][1].keys() == out["plain"][1].keys() and out["plain"][1]
        for name in out["plain"][1]:
            torch.testing.assert_close(out[path][1][name], out["plain"][1][name], atol=1e-5, rtol=1e-4)


def test_count_path_with_underflowing_exponentials_equals_plain_path():
    """Scores spanning hundreds of nats: e^(score - row max) underflows to 0 for every token present in
    some sequences; the count path then normalises per sequence, as the plain softmax does."""
    model = _model(2, 4, 12)
    with torch.no_grad():
        model.W_Q.mul_(400.0)
    task = LCATask(4, 12)
    g = torch.Generator().manual_seed(3)
    x = torch.stack([task.sample(64, g)[0] for _ in range(2)])
    with torch.no_grad():
        s = model.score_table()[:, :16, :16]
        assert float((s.amax(-1) - s.amin(-1)).max()) > 200      # the fallback is exercised
        torch.testing.assert_close(model.forward_counts(counts(x, 16), x[..., -1]), model.forward_plain(x),
                                   atol=1e-3, rtol=1e-4)


def test_plain_path_matches_per_position_definition():
    """forward_plain against a literal loop over positions for one sequence."""
    model = _model(1, 3, 4)
    x = torch.tensor([[[1, 5, 5, 2, 7]]])
    W_E, W_Q, W_K, W_V = model.W_E[0], model.W_Q[0], model.W_K[0], model.W_V[0]
    h = W_E[x[0, 0]]
    q = W_Q @ h[-1]
    a = torch.softmax(torch.stack([q @ (W_K @ h_l) for h_l in h]) / math.sqrt(4), 0)
    o = sum(a_l * (W_V @ h_l) for a_l, h_l in zip(a, h))
    torch.testing.assert_close(model(x, "plain")[0, 0], W_E @ o, atol=1e-5, rtol=1e-5)


def test_uniform_attention_and_attention_map_rows():
    model = _model(1, 3, 4, uniform_attention=True)
    assert not model.W_Q.requires_grad and (model.W_Q == 0).all()
    A = _model(2, 3, 4).attention_map(8)
    assert A.shape == (2, 8, 8)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 8))


def _cfg(**flat):
    base = {"task.m": 4, "task.L": 16, "model.d_model": 16, "optim.steps": 30, "optim.batch_size": 32,
            "eval.n_eval": 256}
    return replace(SPEC.make_config(), **{**base, **flat})


@pytest.mark.parametrize("flat", [{}, {"model.W_V": "identity"}, {"model.embeddings": "frozen"}])
@pytest.mark.parametrize("threads", [1, 2])   # 2: the stack trains as two parallel parts (run_split)
def test_ensemble_member_equals_single_run(flat, threads):
    cfgs = [_cfg(seed=s, **flat) for s in range(4)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stacked = SPEC.run_stack(cfgs)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    for i in (0, 3):
        single = SPEC.run(cfgs[i])
        assert single.metrics["accuracy"] == stacked[i].metrics["accuracy"]
        for k in single.weights:
            torch.testing.assert_close(single.weights[k], stacked[i].weights[k], atol=1e-6, rtol=1e-5)
    # different seeds really differ
    assert not torch.equal(stacked[0].weights["W_E"], stacked[1].weights["W_E"])


def test_frozen_embeddings_stay_at_init_and_weights_round_trip():
    cfg = _cfg(**{"model.embeddings": "frozen"})
    res = SPEC.run(cfg)
    init = SPEC.run(replace(cfg, **{"optim.steps": 0}))
    assert torch.equal(res.weights["W_E"], init.weights["W_E"])
    assert not torch.equal(res.weights["W_V"], init.weights["W_V"])
    model = model_from_weights(cfg, [res.weights])
    assert model.W_E.shape == (1, 17, 16)


def test_training_learns_beyond_chance():
    res = SPEC.run(_cfg(**{"optim.steps": 150, "optim.batch_size": 128}))
    assert res.status == "ok"
    assert res.metrics["accuracy"] > 0.3      # chance is 1/16
