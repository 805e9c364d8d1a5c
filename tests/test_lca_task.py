"""The LCA generator against its definition (lca.md, Data)."""
import pytest
import torch
from scipy.stats import chisquare

from assocmem.tasks.lca import LCATask, alias_table, context_table, hamming, latent_bits, mix


def test_msb_first_ids_and_vocab():
    bits = latent_bits(3)
    assert bits[1].tolist() == [0, 0, 1] and bits[4].tolist() == [1, 0, 0]
    task = LCATask(5, 16)
    assert task.vocab_size == 2 ** 5 + 1 and task.unknown == 32
    assert hamming(3)[0b101, 0b011] == 2


def test_context_table_definition():
    p = context_table(4)
    assert torch.allclose(p.sum(1), torch.ones(16, dtype=torch.float64))
    assert (p.diagonal() == 0).all()
    # ratio of two neighbours is exp(-(D1 - D2))
    assert p[0, 0b0001] / p[0, 0b0011] == pytest.approx(torch.e)
    pc = context_table(4, cluster=2)
    prefix = torch.arange(16) >> 2
    assert (pc[prefix[:, None] != prefix[None, :]] == 0).all()


def test_alias_table_is_exact():
    q = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    prob, alias = alias_table(q)
    V = len(q)
    implied = prob / V
    implied = implied.index_add(0, alias, (1 - prob) / V)
    assert torch.allclose(implied, q, atol=1e-12)


@pytest.mark.parametrize("cluster", [0, 1, 2])
def test_last_token_chi_square(cluster):
    m = 5
    task = LCATask(m, 8, cluster=cluster)
    g = torch.Generator().manual_seed(1)
    x, t = task.sample(200_000, g)
    assert x.min() >= 0 and x.max() < 2 ** m and (x != task.unknown).all()
    last = x[:, -1]
    assert not (last == t).any(), "t itself is never drawn from p(.|t)"
    if cluster:
        assert ((last >> (m - cluster)) == (t >> (m - cluster))).all()
    # pooled over targets: the flip pattern last xor t follows q = p(.|0)
    flips = torch.bincount(last ^ t, minlength=2 ** m).double()
    q = task.p[0]
    support = q > 0
    assert flips[~support].sum() == 0
    stat = chisquare(flips[support].numpy(), (q[support] * len(last)).numpy())
    assert stat.pvalue > 1e-3
    # and per target for one t: chi-square of the conditional
    sel = last[t == 3]
    obs = torch.bincount(sel, minlength=2 ** m).double()
    exp = task.p[3] * len(sel)
    keep = exp > 0
    assert chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue > 1e-3


def test_noise_fraction_and_noise_is_uniform():
    task = LCATask(4, 64, rho=0.5)
    g = torch.Generator().manual_seed(2)
    x, t, noise = task.sample(20_000, g, return_noise=True)
    assert abs(noise.float().mean().item() - 0.5) < 0.01
    nz = x[:, :-1][noise]
    counts = torch.bincount(nz, minlength=16).double()
    assert chisquare(counts.numpy()).pvalue > 1e-3          # noise is uniform, t itself included
    inf_t = t[:, None].expand(-1, 63)[~noise]
    assert not (x[:, :-1][~noise] == inf_t).any()          # informative draws never equal t
    task0 = LCATask(4, 16, rho=0.0)
    _, _, n0 = task0.sample(1000, g, return_noise=True)
    assert n0.all()


def test_sampler_is_seeded_and_draw_decode_split_agrees():
    task = LCATask(6, 32)
    a = task.sample(64, torch.Generator().manual_seed(5))
    b = task.sample(64, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    t, u = task.draw(64, torch.Generator().manual_seed(5))
    assert torch.equal(task.decode(t, u), a[0])
    # decode is elementwise over leading dims: a stack of two equals two separate calls
    t2, u2 = task.draw(64, torch.Generator().manual_seed(6))
    both = task.decode(torch.stack([t, t2]), torch.stack([u, u2]))
    assert torch.equal(both[1], task.decode(t2, u2))


def test_mixing_rate_extremes_and_fraction():
    g = torch.Generator().manual_seed(3)
    xa, xb = torch.zeros(1000, 50, dtype=torch.long), torch.ones(1000, 50, dtype=torch.long)
    assert torch.equal(mix(xa, xb, 0.0, g), xa) and torch.equal(mix(xa, xb, 1.0, g), xb)
    assert abs(mix(xa, xb, 0.3, g).float().mean().item() - 0.3) < 0.01
