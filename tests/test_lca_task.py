"""The LCA generator against its definition (lca.md, Data)."""
import math

import pytest
import torch
from scipy.stats import chisquare

from assocmem.tasks.lca import LCATask, _negative_positions, alias_table, context_table, hamming, latent_bits, mix


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
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = task.sample(64, gen(5))
    b = task.sample(64, gen(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], task.sample(64, gen(6))[0])
    g = gen(5)
    x, t = task.decode(task.draw(64, g), 64, g)
    assert torch.equal(x, a[0]) and torch.equal(t, a[1])
    # a stack decoded with one generator per instance == each instance decoded alone
    g5, g6 = gen(5), gen(6)
    words = torch.stack([task.draw(64, g5), task.draw(64, g6)])
    xs, ts = task.decode(words, 64, [g5, g6])
    g = gen(6)
    x6, t6 = task.decode(task.draw(64, g), 64, g)
    assert torch.equal(xs[1], x6) and torch.equal(ts[1], t6) and torch.equal(xs[0], a[0])


def test_exhausted_fraction_reserve_continues_from_the_generator():
    """Straddling draws beyond the reserved words continue each instance's own stream."""
    from assocmem.tasks.lca import fraction_bits
    reserve = torch.tensor([[1, 2], [3, 4]])
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    low = fraction_bits(reserve, gens, per=10, bits=48)
    out = low(torch.tensor([0, 4, 7, 9, 12]))               # instance 0: four draws, instance 1: one
    fresh = torch.empty(2, dtype=torch.long).random_(generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [1, 2, *(fresh & (2 ** 48 - 1)).tolist(), 3]


def test_mixing_rate_extremes_and_fraction():
    g = torch.Generator().manual_seed(3)
    xa, xb = torch.zeros(1000, 50, dtype=torch.long), torch.ones(1000, 50, dtype=torch.long)
    assert torch.equal(mix(xa, xb, 0.0, g), xa) and torch.equal(mix(xa, xb, 1.0, g), xb)
    assert abs(mix(xa, xb, 0.3, g).float().mean().item() - 0.3) < 0.01


@pytest.mark.parametrize("m", [3, 6, 10])
def test_cell_table_is_the_alias_method_exactly(m):
    """Cells + lazily drawn fraction bits == the plain alias test on the same 63 bits, and the
    tables' implied law == the target law."""
    task = LCATask(m, 4)
    cells = task.cells
    C = 2 * task.V
    b = C.bit_length() - 1
    g = torch.Generator().manual_seed(m)
    k = torch.randint(2 ** cells.index_bits, (50_000,), generator=g)
    low = torch.empty(50_000, dtype=torch.long).random_(0, 2 ** cells.low_bits, generator=g)
    # force many draws into straddling cells, where the fraction bits decide
    straddle = (cells.fixed[:2 ** cells.index_bits] < 0).nonzero().squeeze(1)
    k[:20_000] = straddle[torch.randint(len(straddle), (20_000,), generator=g)]
    asked = []
    j = cells.sample(k, lambda idx: asked.append(idx) or low[idx])
    assert len(asked) == 1 and (k[asked[0]].unsqueeze(1) == straddle).any(1).all()
    r = (k << cells.low_bits) | low                                    # the same 63 bits, in one integer
    target = torch.cat([task.rho * task.p[0], torch.full((task.V,), (1 - task.rho) / task.V, dtype=torch.float64)])
    prob, alias = alias_table(target)
    col, frac = r >> (63 - b), r & (2 ** (63 - b) - 1)
    theta = torch.tensor([math.ceil(v * 2.0 ** (63 - b)) for v in prob.tolist()])
    assert torch.equal(j, torch.where(frac < theta[col], col, alias[col]))
    # implied law of table 0, cell by cell: fixed cells carry 2^-index_bits, straddling ones split
    n = 2 ** cells.index_bits
    law = torch.zeros(C, dtype=torch.float64)
    fixed = cells.fixed[:n]
    law.index_add_(0, fixed[fixed >= 0], torch.full(((fixed >= 0).sum(),), 1.0 / n, dtype=torch.float64))
    s = (fixed < 0).nonzero().squeeze(1)
    keep = cells.residual[s].double() / 2.0 ** cells.low_bits / n
    law.index_add_(0, cells.keep_id[s], keep).index_add_(0, cells.alias_id[s], 1.0 / n - keep)
    torch.testing.assert_close(law, target, atol=1e-15, rtol=0)


def test_packed_fields_of_a_random_word_are_uniform_and_independent():
    """decode cuts four 16-bit fields from each 63-bit word and keeps their low 15 bits: each field
    uniform (the top field too, whose bit 15 is the word's always-zero bit 63), neighbours independent."""
    words = torch.empty(50_000, dtype=torch.long).random_(generator=torch.Generator().manual_seed(0))
    top = (words.view(torch.int16).view(-1, 4).long() & (2 ** 15 - 1)) >> 12          # 8 bins per field
    for i in range(4):
        assert chisquare(torch.bincount(top[:, i], minlength=8).numpy()).pvalue > 1e-3
    for i, j in ((0, 1), (2, 3)):
        joint = top[:, i] * 8 + top[:, j]
        assert chisquare(torch.bincount(joint, minlength=64).numpy()).pvalue > 1e-3


def test_negative_positions_equals_nonzero_over_all_entries():
    g = torch.Generator().manual_seed(3)
    for n, w, rate in ((40, 64, 0.01), (7, 5, 0.5), (3, 8, 0.0), (5, 4, 1.0)):
        rows = torch.randint(0, 100, (n, w), generator=g, dtype=torch.int32)
        rows[torch.rand(n, w, generator=g) < rate] *= -1
        rows[rows == 0] = 1
        assert torch.equal(_negative_positions(rows), (rows.view(-1) < 0).nonzero().squeeze(1))
