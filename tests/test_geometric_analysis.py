"""Analyses on hand-built models: the block construction has known answers for every probe."""
import pytest
import torch

from assocmem.analysis import geometric as an
from assocmem.tasks.geometric import draw_bijections
from assocmem.theory import geometric as th


@pytest.fixture(scope="module")
def block():
    N, R = 256, 4
    bij = draw_bijections(N, R, torch.Generator().manual_seed(0))
    W = {k: v.float() for k, v in th.single_hop_block(bij, 16, torch.Generator().manual_seed(1)).items()}
    return W, bij


def test_superposition_probe_exact_on_block_construction(block):
    W, bij = block
    N = bij.shape[1]
    p = an.superposition_probe(W["W_E"][:N], bij, W["W_U"], torch.Generator().manual_seed(2))
    assert p["r2_heldout"] > 0.999 and p["r2_shuffled"] <= 0
    assert an.per_relation_decoding(W["W_E"][:N], bij, W["W_U"], torch.Generator().manual_seed(2)) == [1.0] * 4


def test_probe_on_random_embeddings_is_null():
    N, R, d = 256, 2, 16
    g = torch.Generator().manual_seed(3)
    bij = draw_bijections(N, R, g)
    p = an.superposition_probe(torch.randn(N, d, generator=g), bij, torch.randn(N, d, generator=g), g)
    assert p["r2_heldout"] < 0.05


def test_causal_swap_and_gating_on_block_construction(block):
    W, bij = block
    sw = an.causal_swap(W, bij, 100, torch.Generator().manual_seed(4))
    assert sw == {"swap_success": 1.0, "swap_preservation": 1.0}
    gt = an.mlp_gating(W, bij)
    assert min(gt["linearity_r2"]) > 0.999
    assert gt["mean_selectivity"] == pytest.approx(1.0)   # one relation per unit
    abl = torch.tensor(gt["ablation"])
    assert (abl.diagonal() < 0.05).all() and (abl + torch.eye(4) >= 1.0).all()


def test_zero_shot_transfer_on_block_construction(block):
    W, bij = block
    new = an.fresh_bijections(bij.shape[1], bij.shape[0], 99)
    assert an.transfer_regression(W, bij, new) == 1.0
    assert an.transfer_inverse(W, bij, new) >= 0.99
    assert an.random_reinit_accuracy(W, new, torch.Generator().manual_seed(5)) < 0.05
    assert an.transfer_regression(W, bij, new, lam=None, gen=torch.Generator().manual_seed(6)) == 1.0
    # baseline: the map of another construction (other codes, other bijections) does not transfer
    bij2 = draw_bijections(bij.shape[1], bij.shape[0], torch.Generator().manual_seed(7))
    W2 = {k: v.float() for k, v in th.single_hop_block(bij2, 16, torch.Generator().manual_seed(8)).items()}
    assert an.transfer_from(W, W2, bij2, new) < 0.05


def test_ridge_cv_prefers_small_ridge_on_clean_linear_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 10, generator=g)
    Y = X @ torch.randn(10, 3, generator=g) + 0.01 * torch.randn(400, 3, generator=g)
    M, b, lam = an.ridge_cv(X, Y, g)
    assert lam <= 1e-2 and an.r2(Y, X.double() @ M + b) > 0.999
