"""Task generator and explicit constructions for geometric factual recall (spec geometric.md)."""
import math

import pytest
import torch

from assocmem.models.geometric import StackedTransformer
from assocmem.tasks.geometric import (IGNORE, all_chains, compose, draw_bijections, information_bits,
                                      log2_factorial, multi_hop, single_hop)
from assocmem.theory import geometric as th


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_bijections_and_single_hop_enumerate_all_facts():
    N, R = 64, 3
    bij = draw_bijections(N, R, gen())
    for r in range(R):
        assert sorted(bij[r].tolist()) == list(range(N))  # each relation is a bijection
    data = single_hop(bij)
    assert data.tokens.shape == (N * R, 2)
    pairs = {(int(s), int(r) - N) for s, r in data.tokens.tolist()}
    assert len(pairs) == N * R  # exactly N*R distinct facts
    assert torch.equal(data.targets[:, -1], bij[data.chain[:, 0], data.subj])
    assert (data.targets[:, 0] == IGNORE).all()
    dis = single_hop(bij, disjoint=True)
    assert dis.vocab.n_out == N * R and torch.equal(dis.targets[:, -1] // N, dis.chain[:, 0])


def test_information_content_matches_table():
    for N, bits in [(256, 1684), (1024, 8769), (4096, 43250), (16384, 205747)]:
        assert abs(log2_factorial(N) - bits) < 1
    assert information_bits(1024, 4) == pytest.approx(4 * log2_factorial(1024))
    assert log2_factorial(10) == pytest.approx(math.log2(math.factorial(10)))


def test_chains_compose_and_cot_targets():
    N, R, K = 32, 3, 3
    bij = draw_bijections(N, R, gen(1))
    for k in (1, 2, 3):
        data = multi_hop(bij, k, K, cot=True)
        assert data.n_queries == R ** k * N
        for i in [0, 5, data.n_queries - 1]:
            s, ch = int(data.subj[i]), data.chain[i].tolist()
            a, inter = s, []
            for r in ch:
                a = int(bij[r, a])
                inter.append(a)
            assert data.targets[i, K:K + k].tolist() == inter          # CoT targets = intermediate answers
            assert data.tokens[i, K + 1:K + k].tolist() == inter[:-1]  # teacher forcing
            assert data.tokens[i, :k].tolist() == [N + r for r in ch]
        nocot = multi_hop(bij, k, K, cot=False)
        assert torch.equal(nocot.targets[:, K], data.targets[:, K + k - 1])
    ch = all_chains(R, 2)[7]
    assert torch.equal(compose(bij, ch)[-1], bij[ch[1], bij[ch[0]]])


def test_noise_format_places_subject_and_relation():
    bij = draw_bijections(16, 2, gen())
    data = single_hop(bij, order="noise", n_noise=10, T=8, gen=gen(3))
    assert data.tokens.shape == (32, 8) and (data.tokens[:, -1] == data.vocab.QUERY).all()
    for row, s, r in zip(data.tokens.tolist(), data.subj.tolist(), data.chain[:, 0].tolist()):
        assert row[:-1].count(s) == 1 and row[:-1].count(16 + r) == 1


def _acc(W, data, dtype=torch.float32):
    return th.recall_metrics(StackedTransformer.from_weights(W, dtype=dtype), data)


@pytest.mark.parametrize("N", [256, 1024, 4096])
def test_block_construction_is_exact(N):
    R = 4
    bij = draw_bijections(N, R, gen(N))
    data = single_hop(bij)
    for d0 in (2, 8, 16):
        W = th.single_hop_block(bij, d0, gen(d0))
        assert W["W_E"].shape[1] == (R + 1) * d0 + R + 2 and W["W_1"].shape[1] == 2 * R * d0
        # d0 = 2 codes can be closer than float32 resolution: evaluate that one in float64
        res = _acc(W, data, torch.float64 if d0 == 2 else torch.float32)
        assert float(res["accuracy"]) == 1.0
    assert float(res["min_margin"]) > 0.03


@pytest.mark.parametrize("N", [256, 1024, 4096])
def test_overlapping_construction(N):
    bij = draw_bijections(N, 4, gen(N + 1))
    W = th.overlapping(bij, 192 if N == 256 else 256, gen(2))
    assert float(_acc(W, single_hop(bij))["accuracy"]) == 1.0


@pytest.mark.parametrize("N", [256, 1024, pytest.param(4096, marks=pytest.mark.slow)])
def test_cot_construction_any_depth(N):
    R, d0 = 4, 8
    bij = draw_bijections(N, R, gen(N + 2))
    for k in (1, 2, 4, 8):
        n_ch = 4 if N == 4096 else 8  # a sample of chains (R^k * N queries are too many at k = 8)
        chains = all_chains(R, k) if k == 1 else torch.randint(0, R, (n_ch, k), generator=gen(k))
        W = th.cot_multihop(bij, d0, k, gen(3))
        assert W["W_1"].shape[1] == 2 * R * d0  # width independent of k
        assert float(_acc(W, multi_hop(bij, k, k, True, chains))["accuracy"]) == 1.0


@pytest.mark.parametrize("N", [256, 1024, pytest.param(4096, marks=pytest.mark.slow)])
def test_nocot_construction(N):
    for k, R in [(2, 2), (2, 3), (3, 2), (2, 4)]:
        bij = draw_bijections(N, R, gen(N + k + R))
        W = th.nocot_multihop(bij, 8, k, 3, gen(4))
        assert W["W_1"].shape[1] == 2 * R ** k * 8
        assert float(_acc(W, multi_hop(bij, k, 3, False))["accuracy"]) == 1.0


def test_noise_robustness_needs_larger_blocks():
    N, R = 1024, 4
    bij = draw_bijections(N, R, gen(7))
    data = single_hop(bij)
    acc = {}
    for d0 in (8, 32):
        W = th.with_embedding_noise(th.single_hop_block(bij, d0, gen(8)), N, d0, R, 0.5, gen(9))
        acc[d0] = float(_acc(W, data)["accuracy"])
    assert acc[32] == 1.0 and acc[8] < 0.99
