"""LCA analyses on hand-built models with known answers."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from assocmem.analysis import lca as A
from assocmem.models.lca import LCAModel
from assocmem.runners.lca import sample_stack
from assocmem.tasks.lca import LCATask, latent_bits
from assocmem.theory.lca import constructed_W_V, constructed_orthonormal_predict


def canonical_embeddings(m: int, c: float = 1.0) -> torch.Tensor:
    """u_z = [c; 2z - 1]: <u_z, u_z'> = c^2 + m - 2 D_H(z, z')."""
    signs = 2.0 * latent_bits(m).double() - 1
    return torch.cat([torch.full((2 ** m, 1), c, dtype=torch.float64), signs], 1)


def orthonormal_model(m: int, S: int = 2, W_V: torch.Tensor | None = None) -> LCAModel:
    """d = V + 1, W_E = I (orthonormal embeddings incl. the unknown token), uniform attention."""
    V1 = 2 ** m + 1
    E = torch.eye(V1).expand(S, V1, V1).clone()
    Z = torch.zeros(S, V1, V1)
    return LCAModel(E, Z.clone(), Z.clone(), torch.randn(S, V1, V1) if W_V is None else W_V,
                    train_embeddings=False, uniform_attention=True)


def test_mean_sem_and_summarize():
    mu, se = A.mean_sem([1.0, 2.0, 3.0])
    assert mu == 2.0 and se == pytest.approx(1 / math.sqrt(3))
    assert A.mean_sem([0.5]) == (0.5, 0.0)
    df = pd.DataFrame({"g": [1, 1, 2, 2], "accuracy": [0.1, 0.3, 0.5, 0.5]})
    s = A.summarize(df, ["g"])
    assert s["mean"].tolist() == pytest.approx([0.2, 0.5]) and s["sem"].tolist() == pytest.approx([0.1, 0.0])
    assert s["n"].tolist() == [2, 2]


def test_hamming_inner_is_exact_on_canonical_embeddings():
    m = 4
    U = canonical_embeddings(m, c=2.0)
    H = A.hamming_inner(U)
    expected = torch.tensor([4.0 + m - 2 * k for k in range(m + 1)], dtype=torch.float64)
    torch.testing.assert_close(H, expected)
    HS = A.hamming_inner(torch.stack([U, 3 * U]))
    torch.testing.assert_close(HS[1], 9 * expected)


def test_spectrum_of_low_rank_embeddings_has_m_plus_1_nonzero_values():
    m, d = 5, 16
    U = canonical_embeddings(m)                                  # [V, m+1], rank m+1
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    W_E = torch.cat([U @ Q[: m + 1], torch.zeros(1, d, dtype=torch.float64)])   # rotate into R^d, unknown row 0
    sv = A.spectrum(W_E[None])[0]
    assert sv.shape == (d,)
    assert (sv[: m + 1] > 1.0).all() and (sv[m + 1:] < 1e-8).all()


def test_block_contrast_and_heat_map_of_cluster_attention():
    m, c, d = 4, 2, 8
    V = 2 ** m
    # embeddings whose first coordinates encode the cluster (first c bits); W_Q = W_K = big on them
    bits = latent_bits(m).float()
    E = torch.zeros(1, V + 1, d)
    E[0, :V, :c] = 2 * bits[:, :c] - 1
    E[0, :V, c:c + m] = 0.1 * bits
    W_Q = torch.zeros(1, d, d)
    W_Q[0, :c, :c] = 3.0 * torch.eye(c)
    model = LCAModel(E, W_Q, W_Q.clone(), None)
    heat = A.attention_heat_map(model)
    assert heat.shape == (V, V)
    torch.testing.assert_close(heat.sum(1), torch.ones(V))
    assert A.block_contrast(heat, c) > 10
    assert A.block_contrast(torch.full((V, V), 1.0 / V), c) == pytest.approx(1.0)


def test_constructed_replacement_equals_reference_decoder():
    """Orthonormal embeddings, uniform attention: replacing W_V by W_V^con gives the Hamming-1
    neighbour-count decoder on the same sequences (up to float tie-breaking between equal counts)."""
    m, L, n = 4, 32, 512
    model = orthonormal_model(m, S=2)
    task = LCATask(m, L)
    gens = lambda: [torch.Generator().manual_seed(10 + s) for s in range(2)]  # noqa: E731
    acc = A.replaced_accuracy(model, task, "constructed", gens(), n, torch.Generator().manual_seed(0))
    x, t = sample_stack(task, n, gens())
    expected = torch.stack([(constructed_orthonormal_predict(x[s], m) == t[s]).float().mean() for s in range(2)])
    assert (acc - expected).abs().max() <= 0.03
    assert (acc > 0.5).all()
    rand = A.replaced_accuracy(model, task, "random", gens(), n, torch.Generator().manual_seed(0))
    assert (rand < 0.2).all()                    # chance is 1/16


def test_principal_angles_zero_for_the_matching_construction():
    m, S = 4, 2
    model = orthonormal_model(m, S)
    U = model.W_E.detach()[:, :-1]
    with torch.no_grad():
        model.W_V.copy_(constructed_W_V(U))
    ang = A.principal_angles(model, m, torch.Generator().manual_seed(0))
    assert set(ang) == {"constructed", "random", "gaussian"} and len(ang["constructed"]) == S
    assert max(ang["constructed"]) < 1e-3
    assert min(ang["gaussian"]) > 1.0
    with pytest.raises(ValueError):
        A.principal_angles(LCAModel(model.W_E.detach(), model.W_Q.detach(), model.W_K.detach(), None), m,
                           torch.Generator())


def test_mixing_curves_of_a_near_perfect_decoder():
    m, L = 3, 256
    model = orthonormal_model(m, S=1)
    with torch.no_grad():
        model.W_V.copy_(constructed_W_V(model.W_E.detach()[:, :-1]))
    task = LCATask(m, L)
    df = A.mixing_accuracy(model, task, [0.0, 0.25, 0.5, 0.75, 1.0], [torch.Generator().manual_seed(3)], 512,
                           torch.Generator().manual_seed(4))
    assert list(df.columns) == ["instance", "r", "target_true", "target_false"] and len(df) == 5
    assert df.target_true.iloc[0] > 0.95 and df.target_false.iloc[-1] > 0.95
    assert df.target_true.iloc[-1] < 0.3 and df.target_false.iloc[0] < 0.3
    assert abs(A.crossing_rate(df.r, df.target_true, df.target_false) - 0.5) < 0.1


def test_crossing_rate_best_lr_and_monotone():
    r = np.linspace(0, 1, 11)
    assert A.crossing_rate(r, 1 - r, r) == pytest.approx(0.5)
    assert math.isnan(A.crossing_rate(r, r + 2, r))
    df = pd.DataFrame({"task.m": 5, "model.d_model": 16, "task.L": [8, 8, 8, 8, 16, 16],
                       "optim.lr": [0.01, 0.01, 0.001, 0.001, 0.01, 0.001],
                       "accuracy": [0.2, 0.3, 0.4, 0.2, 0.9, 0.5]})
    best = A.best_lr(df)                      # L=8: 0.25 (1e-2) vs 0.30 (1e-3); L=16: 0.9 (1e-2) vs 0.5
    assert best["task.L"].tolist() == [8, 8, 16] and best["optim.lr"].tolist() == [0.001, 0.001, 0.01]
    assert A.is_monotone([1, 2, 2, 3]) and not A.is_monotone([1, 3, 2])
    assert A.is_monotone([3, 2, 2.01], increasing=False, slack=0.02)


def test_bayes_ceiling_short_context():
    assert A.bayes_ceiling(5, 8, n=4096) == pytest.approx(0.31, abs=0.03)
