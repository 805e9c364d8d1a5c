"""Associative-memory constructions of the induction head and the closed-form logit rule.

Memories (score convention: query x_t, key x_s, score x_t^T W_K x_s; no 1/sqrt(d) in constructions):

    W_K^1 = beta1 sum_{t=1}^{T-1} p_t p_{t-1}^T          previous-token head (APE)
            or a relative bias b_1 = beta1                 (RPE; no positions in the residual)
    W_K^2 = beta2 sum_{k in Q} w_E(k) w_1(k)^T             w_1(k) = W_O^1 W_V^1 w_E(k)
    W_O^2 = sum_k lambda_k w_U(k) w_2(k)^T                 w_2(k) = W_V^2 w_E(k)
    W_F   = sum_{i,j} mu_ij w_U(j) w_E(i)^T                mu_ij = mu * l_ij, l_ij = log(pi_b(j|i)+eps)
                                                           centred over j; applied to w_E(z_t)
The associative-memory transformer (AMT) uses scalar lambda and mu; the weighted ("stronger") AMT
uses per-output weights lambda_k and per-association weights mu_ij.

Closed-form rule (AMT logits at the last position T, query q = z_T):
    S(q) = {s <= T : z_{s-1} = q},  n_k = #{s in S(q) : z_s = k}
    xi(k) ~= lambda * n_k / |S(q)| + mu * log pi_b(k | q)        (first term absent when S(q) empty)
Count-dependent ("weighted AMT") rule for trained models (C-14 b):
    xi(k) ~= lambda(n_k) + mu * log pi_b(k | q),   lambda(0) = 0, lambda(n) free per count n
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.induction import SimplifiedInduction


def orthonormal_rows(n: int, d: int, g: torch.Generator) -> Tensor:
    """[n, d] with orthonormal rows (n <= d), from the QR of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None]
    return q.T.float().contiguous()


def centred_log_bigram(pi_b: Tensor, eps: float = 1e-3) -> Tensor:
    """l_ij = log(pi_b(j|i) + eps) minus its mean over j; [N, N] float32."""
    lg = torch.log(pi_b.double() + eps)
    return (lg - lg.mean(1, keepdim=True)).float()


def build_amt(pi_b: Tensor, d_model: int = 256, pos: str = "ape", T_train: int = 256, n_ctx: int = 1024,
              beta1: float = 30.0, beta2: float = 30.0, lam: float | Tensor = 20.0,
              mu: float | Tensor = 1.0, key_tokens: Tensor | None = None, eps: float = 1e-3,
              seed: int = 0, basis: str = "random") -> SimplifiedInduction:
    """The calibrated AMT (spec "Calibrated construction"): a single-instance SimplifiedInduction.

    pi_b [N, N] bigram table; pos 'ape' (W_K^1 stores p_t -> p_{t-1} for t < T_train) or 'rel_bias'
    (bias beta1 at offset 1); key_tokens: the query tokens Q of W_K^2 (None: all tokens); lam scalar
    or [N] (per output); mu scalar or [N, N] (per association; weighted AMT).
    basis 'random': the spec's calibrated construction (orthonormal W_E and W_U, independent; W_V1,
    W_O1, W_V2 random N(0, 1/d)). basis 'orthogonal' (idealised, needs d >= 3N): w_E(k), w_1(k) and
    w_U(k) are orthonormal and mutually orthogonal (W_V1 = I, W_O1 = sum_k f_k w_E(k)^T, W_V2 =
    sum_k w_E(k) w_E(k)^T); with RPE the logits then equal the closed-form rule up to e^{-beta2}.
    """
    if pos not in ("ape", "rel_bias"):
        raise ValueError(f"pos: {pos!r} is not allowed (allowed: ape, rel_bias)")
    N, d = pi_b.shape[0], d_model
    g = torch.Generator().manual_seed(seed)
    m = SimplifiedInduction([torch.Generator().manual_seed(seed)], N, d, n_ctx, pos=pos, ffn="linear",
                            scale_scores=False, ffn_input="embedding")
    if basis == "orthogonal":
        if 3 * N > d:
            raise ValueError(f"basis: 'orthogonal' needs d_model >= 3N = {3 * N} (got {d})")
        B3 = orthonormal_rows(3 * N, d, g)
        E, Fk, U = B3[:N], B3[N:2 * N], B3[2 * N:]
        P = torch.randn(n_ctx, d, generator=g) / math.sqrt(d)
        W_V1, W_O1, W_V2 = torch.eye(d), Fk.T @ E, E.T @ E
    elif basis == "random":
        E = orthonormal_rows(N, d, g)
        U = orthonormal_rows(N, d, g)
        P = torch.randn(n_ctx, d, generator=g) / math.sqrt(d)
        W_V1, W_O1, W_V2 = (torch.randn(d, d, generator=g) / math.sqrt(d) for _ in range(3))
    else:
        raise ValueError(f"basis: {basis!r} is not allowed (allowed: random, orthogonal)")
    if pos == "ape":
        W_K1 = beta1 * P[1:T_train].T @ P[:T_train - 1]                     # sum_t p_t p_{t-1}^T
    else:
        W_K1 = torch.zeros(d, d)
    w1 = E @ (W_O1 @ W_V1).T                                                 # rows w_1(k)
    Q = torch.arange(N) if key_tokens is None else torch.as_tensor(key_tokens).long()
    W_K2 = beta2 * E[Q].T @ w1[Q]
    w2 = E @ W_V2.T                                                          # rows w_2(k)
    lam_k = torch.as_tensor(lam, dtype=torch.float32).expand(N)
    W_O2 = U.T @ (lam_k[:, None] * w2)
    ell = centred_log_bigram(pi_b, eps)
    mu_ij = torch.as_tensor(mu, dtype=torch.float32) * ell                   # [N, N] (i -> j)
    W_F = U.T @ mu_ij.T @ E                                                  # sum mu_ij w_U(j) w_E(i)^T
    vals = {"W_E": E, "P": P, "W_K1": W_K1, "W_V1": W_V1, "W_O1": W_O1, "W_K2": W_K2, "W_V2": W_V2,
            "W_O2": W_O2, "W_F": W_F, "W_U": U}
    with torch.no_grad():
        for k, v in vals.items():
            getattr(m, k).copy_(v[None])
        if pos == "rel_bias":
            m.b_rel.zero_()
            m.b_rel[0, 1] = beta1
    m.requires_grad_(False)
    return m


def ideal_memories(model: SimplifiedInduction, pi_b: Tensor | None = None, T: int = 256,
                   key_tokens: Tensor | None = None, scale: float = 1.0) -> dict[str, Tensor]:
    """The spec's ideal memories for a (stacked) model's frozen embeddings: W_K1, W_K2, W_O2 (+ W_F).

    Each [S, d, d]; unscaled sums (``scale`` multiplies all of them)."""
    E, P, U = model.W_E, model.P[:, :T], model.W_U
    N = E.shape[1]
    out = {"W_K1": scale * P[:, 1:].transpose(1, 2) @ P[:, :-1]}
    w1 = E @ (model.W_O1 @ model.W_V1).transpose(1, 2)
    Q = torch.arange(N) if key_tokens is None else torch.as_tensor(key_tokens).long()
    out["W_K2"] = scale * E[:, Q].transpose(1, 2) @ w1[:, Q]
    w2 = E @ model.W_V2.transpose(1, 2)
    out["W_O2"] = scale * U.transpose(1, 2) @ w2
    if pi_b is not None:
        ell = centred_log_bigram(pi_b)
        out["W_F"] = scale * U.transpose(1, 2) @ ell.T[None] @ E
    return out


def context_counts(z: Tensor, N: int) -> tuple[Tensor, Tensor]:
    """z [B, T] prompts ending with the query q = z[:, -1] -> (n [B, N] successor counts n_k(q),
    size [B] = |S(q)|), over the pairs (z_{s-1}, z_s), s = 1..T-1 (0-based)."""
    q = z[:, -1:]
    hit = (z[:, :-1] == q).float()                                           # z_{s-1} = q
    n = torch.zeros(z.shape[0], N).scatter_add_(1, z[:, 1:], hit)
    return n, hit.sum(1)


def closed_form_logits(z: Tensor, lam: float, mu: float, log_pi: Tensor, empty: str = "global") -> Tensor:
    """xi [B, N] = lam * n_k/|S| + mu * log_pi[q, k] at the last position of prompts z [B, T].

    empty: what the in-context term is when S(q) is empty -- 'global' (absent, the spec's rule) or
    'uniform' (layer-2 attention uniform over all T positions: lam * count_k(z)/T, what a
    construction without an attention sink does)."""
    N = log_pi.shape[0]
    n, size = context_counts(z, N)
    frac = torch.where(size[:, None] > 0, n / size.clamp(min=1)[:, None], torch.zeros_like(n))
    if empty == "uniform":
        uni = torch.zeros(z.shape[0], N).scatter_add_(1, z, torch.ones(z.shape, dtype=torch.float)) / z.shape[1]
        frac = torch.where(size[:, None] > 0, frac, uni)
    elif empty != "global":
        raise ValueError(f"empty: {empty!r} is not allowed (allowed: global, uniform)")
    return lam * frac + mu * log_pi[z[:, -1]]


def fit_lambda_mu(logits: Tensor, z: Tensor, log_pi: Tensor, candidates: bool = False) -> tuple[float, float]:
    """Least-squares (lambda_hat, mu_hat) of last-position logits [B, N] on [n_k/|S|, log_pi(k|q)],
    each centred over k within a prompt (logits are defined up to a per-prompt shift).

    candidates: restrict each prompt to the tokens that compete for top-1 under the rule (the
    in-context successors and the global favourite), centring within that set."""
    N = log_pi.shape[0]
    n, size = context_counts(z, N)
    f1 = torch.where(size[:, None] > 0, n / size.clamp(min=1)[:, None], torch.zeros_like(n))
    f2 = log_pi[z[:, -1]]
    if candidates:
        w = ((n > 0) | (f2 == f2.max(1, keepdim=True).values)).float()
    else:
        w = torch.ones_like(f1)
    cnt = w.sum(1, keepdim=True)

    def centre(v):
        return (v - (v * w).sum(1, keepdim=True) / cnt) * w
    X = torch.stack([centre(f1), centre(f2)], -1).reshape(-1, 2)
    y = centre(logits).reshape(-1, 1)
    sol = torch.linalg.lstsq(X.double(), y.double()).solution[:, 0]
    return float(sol[0]), float(sol[1])


def count_rule_logits(z: Tensor, lam_n: Tensor, mu: float, log_pi: Tensor) -> Tensor:
    """xi [B, N] = lam_n[min(n_k, n_max)] + mu * log_pi[q, k] at the last position of prompts z [B, T];
    lam_n [n_max + 1] with lam_n[0] = 0 (counts above n_max share lam_n[n_max])."""
    n, _ = context_counts(z, log_pi.shape[0])
    idx = n.long().clamp(max=lam_n.shape[0] - 1)
    return lam_n.to(log_pi.dtype)[idx] + mu * log_pi[z[:, -1]]


def fit_count_rule(logits: Tensor, z: Tensor, log_pi: Tensor, n_max: int = 6) -> tuple[Tensor, float]:
    """Least-squares (lam_n [n_max + 1], mu) of last-position logits [B, N] on the indicators
    [n_k = 1], ..., [n_k >= n_max] and log_pi(k|q), each centred over k within a prompt (logits are
    defined up to a per-prompt shift); lam_n[0] = 0. A count that no calibration prompt has gets 0
    (its column is left out of the fit, which keeps the system full rank)."""
    N = log_pi.shape[0]
    n, _ = context_counts(z, N)
    idx = n.long().clamp(max=n_max)
    seen = [j for j in range(1, n_max + 1) if bool((idx == j).any())]
    X = torch.stack([(idx == j).double() for j in seen] + [log_pi[z[:, -1]].double()], -1)
    y = logits.double()[..., None]
    Xc, yc = X - X.mean(1, keepdim=True), y - y.mean(1, keepdim=True)          # centre over k
    sol = torch.linalg.lstsq(Xc.reshape(-1, len(seen) + 1), yc.reshape(-1, 1), driver="gelsd").solution[:, 0]
    lam = torch.zeros(n_max + 1, dtype=torch.float64)
    lam[seen] = sol[:len(seen)]
    return lam.float(), float(sol[len(seen)])
