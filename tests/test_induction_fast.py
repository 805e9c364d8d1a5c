"""Fast training path == plain maths: logits and gradients of ``loss_logits`` and ``chunked_step``."""
import pytest
import torch
import torch.nn.functional as F

from assocmem.models.induction import SimplifiedInduction
from assocmem.models.induction_fast import loss_logits, supports_fast
from assocmem.runners.induction_step import CHUNK_ELEMENTS, chunk_bounds, chunked_step, loss_positions
from assocmem.tasks.induction import TriggerBigram, load_stats


def _model(pos, ffn, d=32, n_ctx=64):
    m = SimplifiedInduction([torch.Generator().manual_seed(i) for i in range(2)], 65, d, n_ctx, pos=pos, ffn=ffn)
    with torch.no_grad():   # non-trivial trained-looking weights (init W_K are tiny)
        g = torch.Generator().manual_seed(7)
        for name in m.trainable:
            p = getattr(m, name)
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if name == "b_rel" else 0.1))
    return m


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _fast_matches_naive(m, z, blocks=False):
    """loss_logits at random query positions equals the naive forward there, gradients included
    (with ``blocks``: the queries in two blocks by position); returns the naive logits at all positions."""
    qpos = torch.randint(0, z.shape[-1], (*z.shape[:2], 6), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(0, 65, (*z.shape[:2], 6), generator=torch.Generator().manual_seed(3))
    ref_all = m.naive_forward(z)
    ref = torch.gather(ref_all, 2, qpos[..., None].expand(-1, -1, -1, 65))
    F.cross_entropy(ref.flatten(0, 2), tgt.flatten()).backward()
    g_ref = _grads(m)
    m.zero_grad()
    q, order = torch.sort(qpos, -1)
    for split in ((False, True) if blocks else (False,)):
        if split:     # the queries in two blocks by position, each on its own prefix: the same maths
            fast = loss_logits(m, z, (q[..., :2], q[..., 2:]))
            fast = torch.zeros_like(fast).scatter_(2, order[..., None].expand(-1, -1, -1, 65), fast)
        else:
            fast = loss_logits(m, z, qpos)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        F.cross_entropy(fast.flatten(0, 2), tgt.flatten()).backward()
        for n, g in _grads(m).items():
            torch.testing.assert_close(g, g_ref[n], atol=1e-5, rtol=1e-4, msg=n)
        m.zero_grad()
    return ref_all.detach()


@pytest.mark.parametrize("pos", ["ape", "ape_sinusoidal", "rel_bias", "none", "rope"])
@pytest.mark.parametrize("ffn", ["none", "linear", "mlp"])
def test_loss_logits_and_grads_equal_naive(pos, ffn):
    m = _model(pos, ffn)
    assert supports_fast(m) == (pos != "rope" and ffn != "mlp")
    z = torch.randint(0, 65, (2, 3, 40), generator=torch.Generator().manual_seed(1))
    ref_all = _fast_matches_naive(m, z, blocks=True)
    with torch.no_grad():
        torch.testing.assert_close(loss_logits(m, z), ref_all, atol=1e-5, rtol=1e-5)
        lg, hooks = loss_logits(m, z, return_attn=True)          # what batch_metrics() reads
        _, ref_hooks = m(z, return_hooks=True)
        torch.testing.assert_close(lg, ref_all, atol=1e-5, rtol=1e-5)
        for k in ("attn1", "attn2"):
            torch.testing.assert_close(hooks[k], ref_hooks[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def stats(shared_data):
    return load_stats(str(shared_data / "tinyshakespeare" / "input.txt"))


@pytest.mark.parametrize("pos,ffn,loss,parts", [("ape", "none", "icl", 1), ("rel_bias", "linear", "all", 1),
                                                ("ape", "linear", "all", 1), ("ape", "none", "icl", 3),
                                                ("rel_bias", "linear", "all", 2)])
def test_chunked_step_equals_full_batch_step(stats, pos, ffn, loss, parts):
    """Micro-batched backward (sorted chunks, per-chunk padding; with ``parts`` > 1 dealt out to forked
    processes) == one full-batch backward of the per-member mean loss, for a stack of 2 members."""
    ds = TriggerBigram(stats, 48, 5, True)
    bs = [ds.sample(10 if parts == 1 else 48, torch.Generator().manual_seed(i)) for i in range(2)]
    x, y, outs = (torch.stack([getattr(b, f) for b in bs]) for f in ("x", "y", "outs"))
    m = _model(pos, ffn)
    lg = m.naive_forward(x)
    ce = F.cross_entropy(lg.flatten(0, 2), y.flatten(), reduction="none").view(y.shape)
    w = (outs >= 2).float() if loss == "icl" else torch.ones_like(ce)
    per = (ce * w).sum((1, 2)) / w.sum((1, 2))
    per.sum().backward()
    g_ref = _grads(m)
    m.zero_grad()
    st = chunked_step(m, x, y, outs, loss, micro_batch=3 if parts == 1 else 2, parts=parts)   # 24 chunks: 3 parts of 8
    torch.testing.assert_close(st["loss"], per.detach(), atol=1e-5, rtol=1e-5)
    acc = ((lg.argmax(-1) == y).float() * (outs >= 2)).sum((1, 2)) / (outs >= 2).sum((1, 2))
    torch.testing.assert_close(st["acc_end"], acc, atol=1e-6, rtol=0)
    for n, g in _grads(m).items():
        torch.testing.assert_close(g, g_ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_loss_positions_pad_per_chunk_and_block():
    outs = torch.tensor([[[0, 2, 0, 3], [0, 0, 0, 2]]])
    (qpos,), valid = loss_positions(outs)
    assert qpos.shape == (1, 2, 2)
    assert qpos[0, 0].tolist() == [1, 3] and valid[0, 1].tolist() == [True, False] and qpos[0, 1].tolist() == [3, 0]
    (lo, hi), valid = loss_positions(outs, blocks=2)          # positions 0-1 and 2-3, padding at 0
    assert lo.tolist() == [[[1], [0]]] and hi.tolist() == [[[3], [3]]]
    assert valid.tolist() == [[[True, True], [False, True]]]


def test_chunk_bounds_cap_and_count_rule():
    # cap: micro_batch, and the attention entries per chunk
    assert chunk_bounds(None, 70, 32, CHUNK_ELEMENTS // 64) == [32, 32, 6]
    assert chunk_bounds(None, 70, 32, CHUNK_ELEMENTS // 16) == [16, 16, 16, 16, 6]
    assert chunk_bounds(None, 3, 32, 4 * CHUNK_ELEMENTS) == [1, 1, 1]
    # sorted loss-position counts: a chunk ends before a count above 2 q + 16 (q = its first count)
    assert chunk_bounds([1, 2, 3, 30, 31, 40, 90, 250], 8, 32, 1) == [3, 3, 1, 1]
    assert chunk_bounds([5] * 40, 40, 32, 1) == [32, 8]


@pytest.mark.parametrize("pos", ["ape", "rel_bias", "rope"])
def test_layer2_log_scaling_fast_equals_naive_and_acts_only_beyond_T0(pos):
    """C-13 remedy: layer-2 scores at position t times max(1, log(t+1)/log T0), in all three forwards."""
    m = _model(pos, "none")
    z = torch.randint(0, 65, (2, 3, 40), generator=torch.Generator().manual_seed(1))
    plain = m.naive_forward(z)
    m.l2_log_T = 16
    ref_all = m.naive_forward(z)
    torch.testing.assert_close(ref_all[:, :, :15], plain[:, :, :15])           # t + 1 <= 16: unchanged
    assert (ref_all[:, :, 20:] - plain[:, :, 20:]).abs().max() > 1e-3          # beyond: scaled
    assert _fast_matches_naive(m, z).equal(ref_all)
    with torch.no_grad():
        torch.testing.assert_close(m(z), ref_all, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_logits(m, z), ref_all, atol=1e-5, rtol=1e-5)
