"""Analyses of trained geometric-recall models (spec geometric.md, E3-E5). All functions take plain
weights (unstacked, names as in ``models.geometric``) plus the bijections ``bij`` [R, N], and work on
hand-built models too (tests use the block construction, whose answers are known).

E3  probes:  ``superposition_probe`` (e_s ~ Phi_s M + b, held-out R^2, shuffled control),
             ``per_relation_decoding``, ``causal_swap``.
E4  gating:  ``mlp_gating`` (within-relation linearity R^2, unit selectivity, ablation matrix).
E5  transfer: ``regression_embeddings`` / ``transfer_regression`` (e'_s = Phi'_s M + b; ridge fixed or
             by held-out R^2, ``ridge_cv``), ``transfer_inverse`` (invert the linearised selector),
             baselines ``random_reinit_accuracy`` and ``transfer_from`` (another model's map),
             ``retrain_embeddings`` (T2: train only subject embeddings, from random or a given init).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.geometric import StackedTransformer
from ..tasks.geometric import draw_bijections, single_hop


def _split(N: int, gen: torch.Generator, frac: float = 0.8) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(N, generator=gen)
    n = int(round(frac * N))
    return perm[:n], perm[n:]


def ridge_fit(X: Tensor, Y: Tensor, lam: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Least squares Y ~ X M + b with a small ridge (relative to the mean feature variance)."""
    X, Y = X.double(), Y.double()
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    G = Xc.T @ Xc
    G += lam * (G.diagonal().mean() + 1e-12) * torch.eye(G.shape[0], dtype=G.dtype)
    M = torch.linalg.solve(G, Xc.T @ Yc)
    return M, ym - xm @ M


LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge_cv(X: Tensor, Y: Tensor, gen: torch.Generator, lams: tuple[float, ...] = LAMBDAS) -> tuple[Tensor, Tensor, float]:
    """Ridge Y ~ X M + b with the ridge chosen by held-out R^2 on an 80/20 split of the rows, refitted on
    all rows: (M, b, lam). Matters when the number of features is close to the number of rows."""
    tr, te = _split(X.shape[0], gen)

    def heldout(lam: float) -> float:
        M, b = ridge_fit(X[tr], Y[tr], lam)
        return r2(Y[te], X[te].double() @ M + b)

    best = max(lams, key=heldout)
    M, b = ridge_fit(X, Y, best)
    return M, b, best


def r2(Y: Tensor, Yhat: Tensor) -> float:
    """Pooled R^2 = 1 - sum (Y - Yhat)^2 / sum (Y - mean Y)^2."""
    Y, Yhat = Y.double(), Yhat.double()
    return float(1 - ((Y - Yhat) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


def attribute_design(bij: Tensor, codes: Tensor) -> Tensor:
    """Phi [N, R*d_u]: row s = [codes[f_1(s)], ..., codes[f_R(s)]]."""
    return torch.cat([codes[bij[r]] for r in range(bij.shape[0])], 1)


def superposition_probe(E: Tensor, bij: Tensor, codes: Tensor, gen: torch.Generator,
                        lam: float = 1e-3) -> dict[str, float]:
    """E3a: regress subject embeddings E [N, d] on Phi (codes [N, d_u], e.g. W_U); R^2 on 20% held-out
    subjects, and the same with each f_r shuffled (control: should be <= 0)."""
    N = E.shape[0]
    tr, te = _split(N, gen)
    Phi = attribute_design(bij, codes)
    M, b = ridge_fit(Phi[tr], E[tr], lam)
    out = {"r2_heldout": r2(E[te], Phi[te].double() @ M + b), "r2_train": r2(E[tr], Phi[tr].double() @ M + b)}
    shuf = torch.stack([bij[r][torch.randperm(N, generator=gen)] for r in range(bij.shape[0])])
    Phs = attribute_design(shuf, codes)
    Ms, bs = ridge_fit(Phs[tr], E[tr], lam)
    out["r2_shuffled"] = r2(E[te], Phs[te].double() @ Ms + bs)
    return out


def probe_map(E: Tensor, bij: Tensor, codes: Tensor, lam: float = 1e-3) -> tuple[Tensor, Tensor]:
    """M [R*d_u, d], b [d] of e_s ~ Phi_s M + b fitted on all subjects."""
    return ridge_fit(attribute_design(bij, codes), E, lam)


def per_relation_decoding(E: Tensor, bij: Tensor, codes: Tensor, gen: torch.Generator,
                          lam: float = 1e-3) -> list[float]:
    """E3b: per relation, regress codes[f_r(s)] on e_s, decode held-out subjects by the nearest code
    (cosine) among all N; accuracy per relation (chance 1/N)."""
    tr, te = _split(E.shape[0], gen)
    cn = codes.double() / codes.double().norm(dim=1, keepdim=True)
    accs = []
    for r in range(bij.shape[0]):
        M, b = ridge_fit(E[tr], codes[bij[r, tr]], lam)
        pred = E[te].double() @ M + b
        accs.append(float(((pred @ cn.T).argmax(1) == bij[r, te]).float().mean()))
    return accs


def _model(W: dict[str, Tensor], layernorm: bool = False) -> StackedTransformer:
    return StackedTransformer.from_weights({k: v for k, v in W.items() if k != "bij"}, layernorm)


@torch.no_grad()
def causal_swap(W: dict[str, Tensor], bij: Tensor, n_trials: int, gen: torch.Generator,
                layernorm: bool = False, lam: float = 1e-3) -> dict[str, float]:
    """E3c: e'_s = e_s + (u_{a'} - u_{f_r(s)}) M_r with M from the E3a fit (codes = W_U). Success: the
    model now answers a' to (s, r); preservation: answers to (s, r') for r' != r are unchanged."""
    R, N = bij.shape
    model = _model(W, layernorm)
    U = W["W_U"][:N].double()
    E = W["W_E"][:N].double()
    M, _ = probe_map(E, bij, U, lam)
    d_u = U.shape[1]
    s = torch.randint(0, N, (n_trials,), generator=gen)
    r = torch.randint(0, R, (n_trials,), generator=gen)
    a_new = (bij[r, s] + torch.randint(1, N, (n_trials,), generator=gen)) % N
    Mr = torch.stack([M[i * d_u:(i + 1) * d_u] for i in range(R)])             # [R, d_u, d]
    delta = torch.einsum("nu,nud->nd", U[a_new] - U[bij[r, s]], Mr[r])         # [n, d]
    # every trial asks all R relations: tokens [n*R, 2]
    rr = torch.arange(R).repeat(n_trials)
    ss = s.repeat_interleave(R)
    tokens = torch.stack([ss, N + rr], 1)
    x = model.embed(tokens)
    x[0, :, 0] += delta.repeat_interleave(R, 0).to(x.dtype)
    pred = model(tokens, (1, 2), x=x)[0, :, 0].argmax(-1).view(n_trials, R)
    orig = bij[torch.arange(R)[None, :], s[:, None]]                             # [n, R]
    hit = pred[torch.arange(n_trials), r] == a_new
    other = torch.ones(n_trials, R, dtype=torch.bool)
    other[torch.arange(n_trials), r] = False
    keep = (pred == orig)[other]
    return {"swap_success": float(hit.float().mean()), "swap_preservation": float(keep.float().mean())}


@torch.no_grad()
def mlp_gating(W: dict[str, Tensor], bij: Tensor, layernorm: bool = False, gen: torch.Generator | None = None,
               ablate_frac: float | None = None) -> dict[str, object]:
    """E4 on the ``[s, r]`` format.

    linearity_r2: per relation, held-out R^2 of the MLP output (h W_2 at the relation position) fitted
    linearly on e_s; selectivity per unit: max_r P(active|r) / sum_r P(active|r) (1/R = unselective);
    ablation [R, R]: accuracy on relation (column) after zeroing the units most specific to relation
    (row) (the m/R units with the largest mean activation on r minus mean on other relations).
    """
    R, N = bij.shape
    gen = gen or torch.Generator().manual_seed(0)
    model = _model(W, layernorm)
    data = single_hop(bij)
    x = model.embed(data.tokens)
    a, _ = model.attend(x, 1, 2)
    y = x[:, :, 1:2] + a
    h = model.mlp_hidden(y)[0, :, 0]                                             # [N*R, m]
    out = h @ model.W_2[0]
    E = W["W_E"][:N]
    tr, te = _split(N, gen)
    lin = []
    for r in range(R):
        o = out[r * N:(r + 1) * N]
        M, b = ridge_fit(E[tr], o[tr], 1e-6)
        lin.append(r2(o[te], E[te].double() @ M + b))
    act = (h > 0).float().view(R, N, -1).mean(1)                                 # [R, m]
    alive = act.sum(0) > 0
    sel = (act.max(0).values / act.sum(0).clamp_min(1e-12))[alive]
    mean_h = h.view(R, N, -1).mean(1)
    k = max(1, int(round((ablate_frac or 1 / R) * h.shape[1])))
    abl = torch.zeros(R, R)
    for r in range(R):
        spec = mean_h[r] - (mean_h.sum(0) - mean_h[r]) / max(R - 1, 1)
        units = spec.topk(k).indices
        hz = h.clone()
        hz[:, units] = 0
        z = y[0, :, 0] + hz @ model.W_2[0]
        if layernorm:
            z = torch.nn.functional.layer_norm(z, z.shape[-1:])
        pred = (z @ model.W_U[0].T).argmax(-1)
        correct = (pred == data.targets[:, -1]).float().view(R, N).mean(1)
        abl[r] = correct
    return {"linearity_r2": lin, "selectivity": sel.tolist(), "mean_selectivity": float(sel.mean()),
            "active_frac": float(alive.float().mean()), "ablation": abl.tolist()}


@torch.no_grad()
def _accuracy_with_embeddings(W: dict[str, Tensor], bij: Tensor, E_new: Tensor, layernorm: bool = False) -> float:
    W2 = {k: v.clone() for k, v in W.items() if k != "bij"}
    W2["W_E"][:bij.shape[1]] = E_new.to(W2["W_E"].dtype)
    model = _model(W2, layernorm)
    data = single_hop(bij)
    pred = model(data.tokens, data.out_pos)[0, :, 0].argmax(-1)
    return float((pred == data.targets[:, -1]).float().mean())


def regression_embeddings(W: dict[str, Tensor], bij: Tensor, bij_new: Tensor, lam: float | None = 1e-3,
                          gen: torch.Generator | None = None) -> Tensor:
    """E5 T1 re-initialisation (spec): E' [N, d], e'_s = Phi'_s M + b with (M, b) the E3a fit of the trained
    embeddings on the trained bijections (codes = W_U rows). ``lam=None`` picks the ridge by held-out R^2
    (:func:`ridge_cv`, split from ``gen``)."""
    N = bij.shape[1]
    U = W["W_U"][:N]
    if lam is None:
        M, b, _ = ridge_cv(attribute_design(bij, U), W["W_E"][:N], gen or torch.Generator().manual_seed(0))
    else:
        M, b = probe_map(W["W_E"][:N], bij, U, lam)
    return (attribute_design(bij_new, U).double() @ M + b).float()


def transfer_regression(W: dict[str, Tensor], bij: Tensor, bij_new: Tensor, layernorm: bool = False,
                        lam: float | None = 1e-3, gen: torch.Generator | None = None) -> float:
    """E5 T1 accuracy on F' with :func:`regression_embeddings` (zero gradient steps)."""
    return _accuracy_with_embeddings(W, bij_new, regression_embeddings(W, bij, bij_new, lam, gen), layernorm)


def transfer_from(W: dict[str, Tensor], W_src: dict[str, Tensor], bij_src: Tensor, bij_new: Tensor,
                  layernorm: bool = False, lam: float = 1e-3) -> float:
    """Baseline: the regression map of another model (W_src, its bijections) used to re-initialise W."""
    return _accuracy_with_embeddings(W, bij_new, regression_embeddings(W_src, bij_src, bij_new, lam), layernorm)


@torch.no_grad()
def transfer_inverse(W: dict[str, Tensor], bij: Tensor, bij_new: Tensor, layernorm: bool = False,
                     lam: float = 1e-4) -> float:
    """E5 T1 (ours): invert the linearised relation-conditioned network.

    For each relation r fit the final residual at the relation position (projected on the row space of
    W_U, the only part the logits see) z_r(e) ~ e A_r + c_r over the
    trained subjects, and take as target for answer a the residual the trained model produced for a,
    t_{r,a} = z_r(e_{f_r^{-1}(a)}). New embeddings solve min_e sum_r |e A_r + c_r - t_{r, f'_r(s)}|^2
    (least squares, zero gradient steps; attention, MLP, W_U untouched).
    """
    R, N = bij.shape
    model = _model(W, layernorm)
    data = single_hop(bij)
    z = model.final_residual(data.tokens, data.out_pos)[0, :, 0].double().view(R, N, -1)  # [R, N, d]
    U = W["W_U"].double()
    z = z @ (torch.linalg.pinv(U) @ U)        # only the part of z that the logits see (row space of W_U)
    E = W["W_E"][:N].double()
    A, c, T = [], [], []
    for r in range(R):
        Ar, cr = ridge_fit(E, z[r], 1e-6)                                          # z ~ E Ar + cr
        inv = torch.empty(N, dtype=torch.long)
        inv[bij[r]] = torch.arange(N)
        A.append(Ar)
        c.append(cr)
        T.append(z[r][inv[bij_new[r]]])                                             # [N, d] targets
    A_all = torch.cat(A, 1)                                                         # [d, R*d]
    rhs = torch.cat([T[r] - c[r] for r in range(R)], 1)                             # [N, R*d]
    G = A_all @ A_all.T
    G += lam * G.diagonal().mean() * torch.eye(G.shape[0], dtype=G.dtype)
    E_new = torch.linalg.solve(G, A_all @ rhs.T).T
    return _accuracy_with_embeddings(W, bij_new, E_new, layernorm)


def random_reinit_accuracy(W: dict[str, Tensor], bij_new: Tensor, gen: torch.Generator,
                           layernorm: bool = False) -> float:
    """Baseline: fresh N(0, 1/d) subject embeddings (expected ~1/N)."""
    N, d = bij_new.shape[1], W["W_E"].shape[1]
    return _accuracy_with_embeddings(W, bij_new, torch.randn(N, d, generator=gen) / math.sqrt(d), layernorm)


def retrain_embeddings(W: dict[str, Tensor], bij_new: Tensor, optim, gen: torch.Generator,
                       layernorm: bool = False, init: Tensor | None = None) -> dict[str, float]:
    """E5 T2: re-initialise the subject embeddings (``init`` or N(0, 1/d)) and train only them on F'."""
    from ..runners.geometric import train
    N, d = bij_new.shape[1], W["W_E"].shape[1]
    W2 = {k: v.clone() for k, v in W.items() if k != "bij"}
    W2["W_E"][:N] = init if init is not None else torch.randn(N, d, generator=gen) / math.sqrt(d)
    model = _model(W2, layernorm)
    data = single_hop(bij_new)
    mask = torch.zeros(1, model.V, 1)
    mask[:, :N] = 1.0
    tr = train(model, data.tokens, data.targets[None], data.out_pos, optim, ["W_E"], masks={"W_E": mask})
    return {"steps": tr["steps"][0], "accuracy": tr["accuracy"][0]}


def fresh_bijections(N: int, R: int, seed: int) -> Tensor:
    return draw_bijections(N, R, torch.Generator().manual_seed(seed))
