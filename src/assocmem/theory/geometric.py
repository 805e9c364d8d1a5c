"""Explicit weight constructions for geometric factual recall [ours; the role of the paper's theorems].

Every builder returns unstacked weights (names and shapes as in ``models.geometric``) that load into
:class:`~assocmem.models.geometric.StackedTransformer` via ``from_weights``. Residual layouts:

* single-hop block:  ``[subject blocks R*d0 | relation gates R | answer d0 | flags subj, rel]``,
  d = (R+1)*d0 + R + 2, one head, MLP width m = 2*R*d0 (relation-gated ReLU selector).
* overlapping:       ``[content D | gates R | answer D | flags subj, rel]``, e_s = sum_c Q_c u_{f_c(s)}
  with random orthogonal Q_c; the selector computes Q_c^T x; m = 2*R*D.
* CoT multi-hop:     ``[blocks R*d0 | gates R | answer d0 | one-hot positions L]``, one positional
  head (offset -K), m = 2*R*d0 for every k.
* no-CoT multi-hop:  ``[blocks R^k*d0 | slot gates K*R | answer d0 | positions L]``, K positional
  heads, AND-gated selector, m = 2*R^k*d0.

Attribute codes u_a are Gaussian vectors normalised to unit length, drawn from the given generator.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.geometric import StackedTransformer
from ..tasks.geometric import GeoData, Vocab, all_chains, compose

BETA = 20.0  # attention sharpness


def unit_codes(n: int, d0: int, gen: torch.Generator) -> Tensor:
    """[n, d0] Gaussian codes normalised to unit norm."""
    u = torch.randn(n, d0, generator=gen, dtype=torch.float64)
    return u / u.norm(dim=1, keepdim=True)


def _empty(V: int, L: int, d: int, H: int, d_h: int, m: int, n_out: int) -> dict[str, Tensor]:
    """All-zero float64 weights (constructions are built in float64; cast when loading)."""
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    return {"W_E": z(V, d), "W_pos": z(L, d), "W_Q": z(H, d, d_h), "W_K": z(H, d, d_h),
            "W_V": z(H, d, d_h), "W_O": z(H, d_h, d), "W_1": z(d, m), "b_1": z(m), "W_2": z(m, d),
            "W_U": z(n_out, d)}


def block_dims(R: int, d0: int) -> dict[str, int]:
    """Offsets of the single-hop block layout and its width d = (R+1)*d0 + R + 2."""
    gate = R * d0
    ans = gate + R
    flag = ans + d0
    return {"gate": gate, "ans": ans, "subj": flag, "rel": flag + 1, "d": flag + 2}


def single_hop_block(bij: Tensor, d0: int, gen: torch.Generator, beta: float = BETA, B: float = 1.0,
                     codes: Tensor | None = None, n_noise_vocab: int = 0) -> dict[str, Tensor]:
    """Block construction for the ``[s, r]`` format; bij [R, N]. Width m = 2*R*d0, d = (R+1)*d0+R+2.

    e_s = sum_r P_r u_{f_r(s)} + 1_subj; e_r = g_r + 1_rel; one head moves the subject blocks to the
    relation position (score beta * x_q[rel] * x_j[subj]); unit (r, j, +/-) computes
    ReLU(+/- x[block r, j] + B x[g_r] - B) and writes +/- to answer[j]; W_U[a] = u_a on the answer block.
    """
    R, N = bij.shape
    voc = Vocab(N, R, n_noise_vocab)
    o = block_dims(R, d0)
    d, m, d_h = o["d"], 2 * R * d0, R * d0
    u = codes if codes is not None else unit_codes(N, d0, gen)
    W = _empty(voc.size, 2, d, 1, d_h, m, N)
    for r in range(R):
        W["W_E"][:N, r * d0:(r + 1) * d0] = u[bij[r]]
        W["W_E"][voc.rel(r), o["gate"] + r] = 1.0
    W["W_E"][:N, o["subj"]] = 1.0
    for r in range(R):
        W["W_E"][voc.rel(r), o["rel"]] = 1.0
    W["W_Q"][0, o["rel"], 0] = beta * math.sqrt(d_h)  # forward divides by sqrt(d_h)
    W["W_K"][0, o["subj"], 0] = 1.0
    W["W_V"][0, :d_h, :] = torch.eye(d_h)
    W["W_O"][0, :, :d_h] = torch.eye(d_h)
    _selector(W, n_blocks=R, d0=d0, block_of=lambda c: c * d0, gate_dims=lambda c: [o["gate"] + c],
              ans=o["ans"], B=B)
    W["W_U"][:, o["ans"]:o["ans"] + d0] = u
    return W


def _selector(W: dict[str, Tensor], n_blocks: int, d0: int, block_of, gate_dims, ans: int, B: float,
              read: Tensor | None = None) -> None:
    """Relation-gated ReLU selector: units (c, j, +/-) = ReLU(+/- read_c[j] . x + B sum_g x[g] - n_g B).

    ``read`` [n_blocks, d, d0] optional: the direction unit (c, j) reads (default: one-hot block c, j).
    """
    for c in range(n_blocks):
        gates = gate_dims(c)
        for j in range(d0):
            for sign, col in ((1.0, 2 * (c * d0 + j)), (-1.0, 2 * (c * d0 + j) + 1)):
                if read is None:
                    W["W_1"][block_of(c) + j, col] = sign
                else:
                    W["W_1"][:, col] = sign * read[c, :, j]
                for g in gates:
                    W["W_1"][g, col] = B
                W["b_1"][col] = -B * len(gates)
                W["W_2"][col, ans + j] = sign


def overlapping(bij: Tensor, D: int, gen: torch.Generator, beta: float = BETA) -> dict[str, Tensor]:
    """Overlapping superposition: e_s = sum_c Q_c u_{f_c(s)} in R^D (C = R codes), random orthogonal Q_c.

    Layout ``[content D | gates R | answer D | flags]``; the selector unit (c, j) reads column j of Q_c,
    gate bias B = max_s max_c |Q_c^T e_s|_inf (so inactive relations are clamped), m = 2*R*D.
    """
    R, N = bij.shape
    voc = Vocab(N, R)
    gate, ans = D, D + R
    subj, rel = ans + D, ans + D + 1
    d, m = ans + D + 2, 2 * R * D
    u = unit_codes(N, D, gen)
    Q = torch.stack([torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0] for _ in range(R)])  # [R, D, D]
    E = sum(u[bij[c]] @ Q[c].T for c in range(R))                                          # [N, D]
    Bgate = max(float((E @ Q[c]).abs().max()) for c in range(R))
    W = _empty(voc.size, 2, d, 1, D, m, N)
    W["W_E"][:N, :D] = E
    W["W_E"][:N, subj] = 1.0
    for r in range(R):
        W["W_E"][voc.rel(r), gate + r] = 1.0
        W["W_E"][voc.rel(r), rel] = 1.0
    W["W_Q"][0, rel, 0] = beta * math.sqrt(D)
    W["W_K"][0, subj, 0] = 1.0
    W["W_V"][0, :D, :] = torch.eye(D)
    W["W_O"][0, :, :D] = torch.eye(D)
    read = torch.zeros(R, d, D)
    read[:, :D, :] = Q
    _selector(W, n_blocks=R, d0=D, block_of=None, gate_dims=lambda c: [gate + c], ans=ans, B=Bgate, read=read)
    W["W_U"][:, ans:ans + D] = u
    return W


def cot_multihop(bij: Tensor, d0: int, K: int, gen: torch.Generator, beta: float = BETA,
                 B: float = 1.0) -> dict[str, Tensor]:
    """CoT construction for the slot format (any k <= K): one positional head with offset -K.

    Position q attends to slot q-K and copies its relation gate; the current token (a_{t-1}) supplies
    its superposed blocks through the residual; the selector emits a_t. L = 2K positions.
    """
    R, N = bij.shape
    voc = Vocab(N, R)
    L = 2 * K
    gate, ans = R * d0, R * d0 + R
    pos = ans + d0
    d, m, d_h = pos + L, 2 * R * d0, max(L, R)
    u = unit_codes(N, d0, gen)
    W = _empty(voc.size, L, d, 1, d_h, m, N)
    for r in range(R):
        W["W_E"][:N, r * d0:(r + 1) * d0] = u[bij[r]]
        W["W_E"][voc.rel(r), gate + r] = 1.0
    W["W_pos"][:, pos:pos + L] = torch.eye(L)
    for q in range(K, L):
        W["W_Q"][0, pos + q, q - K] = beta * math.sqrt(d_h)
    for j in range(L):
        W["W_K"][0, pos + j, j] = 1.0
    for r in range(R):
        W["W_V"][0, gate + r, r] = 1.0
        W["W_O"][0, r, gate + r] = 1.0
    _selector(W, n_blocks=R, d0=d0, block_of=lambda c: c * d0, gate_dims=lambda c: [gate + c], ans=ans, B=B)
    W["W_U"][:, ans:ans + d0] = u
    return W


def nocot_multihop(bij: Tensor, d0: int, k: int, K: int, gen: torch.Generator, beta: float = BETA,
                   B: float = 1.0) -> dict[str, Tensor]:
    """No-CoT construction for chains of length k (K slots): one block per chain, K positional heads.

    Relation tokens store g_{1,r}; head t (query at position K) attends to slot t-1 and writes its
    relation into gates g_{t,.}; unit (c, j, +/-) = ReLU(+/- x[block c, j] + B sum_t x[g_{t,c_t}] - k B)
    passes only when all k gates match. d = R^k*d0 + K*R + d0 + L, m = 2*R^k*d0, L = K+1.
    """
    R, N = bij.shape
    voc = Vocab(N, R)
    chains = all_chains(R, k)
    C = chains.shape[0]
    L = K + 1
    gate = C * d0
    ans = gate + K * R
    pos = ans + d0
    d, m, d_h = pos + L, 2 * C * d0, max(L, R)
    u = unit_codes(N, d0, gen)
    W = _empty(voc.size, L, d, K, d_h, m, N)
    for c in range(C):
        W["W_E"][:N, c * d0:(c + 1) * d0] = u[compose(bij, chains[c])[-1]]
    for r in range(R):
        W["W_E"][voc.rel(r), gate + r] = 1.0
    W["W_pos"][:, pos:pos + L] = torch.eye(L)
    for t in range(K):  # head t reads slot t from the query position K
        W["W_Q"][t, pos + K, t] = beta * math.sqrt(d_h)
        for j in range(L):
            W["W_K"][t, pos + j, j] = 1.0
        for r in range(R):
            W["W_V"][t, gate + r, r] = 1.0
            W["W_O"][t, r, gate + t * R + r] = 1.0
    _selector(W, n_blocks=C, d0=d0, block_of=lambda c: c * d0,
              gate_dims=lambda c: [gate + t * R + int(chains[c, t]) for t in range(k)], ans=ans, B=B)
    W["W_U"][:, ans:ans + d0] = u
    return W


# ---- evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def logits_at_targets(model: StackedTransformer, data: GeoData, tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(logits [S, n, n_out], targets [S, n]) at every target position (teacher forcing)."""
    tok = data.tokens if tokens is None else tokens
    logits = model(tok, data.out_pos)                                  # [S, B, P, n_out]
    tg = data.targets[..., data.out_pos[0]:data.out_pos[1]]
    if tg.dim() == 2:
        tg = tg.expand(model.S, *tg.shape)
    mask = tg[0] >= 0
    return logits[:, mask], tg[:, mask]


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """logit of the target minus the best other logit: [..., n]."""
    true = logits.gather(-1, targets[..., None])[..., 0]
    other = logits.scatter(-1, targets[..., None], float("-inf")).amax(-1)
    return true - other


@torch.no_grad()
def recall_metrics(model: StackedTransformer, data: GeoData, chunk: int = 4096) -> dict[str, Tensor]:
    """Per instance: accuracy over all target positions and min/mean logit margin ([S] each).

    Queries are processed in chunks of ``chunk`` rows to bound memory (same result as one pass).
    """
    correct, mgs = [], []
    for i in range(0, data.n_queries, chunk):
        part = GeoData(data.tokens[..., i:i + chunk, :], data.targets[..., i:i + chunk, :], data.subj[i:i + chunk],
                       data.chain[i:i + chunk], data.out_pos, data.vocab, data.bij)
        lg, tg = logits_at_targets(model, part)
        correct.append(lg.argmax(-1) == tg)
        mgs.append(margins(lg, tg))
    mg = torch.cat(mgs, -1)
    return {"accuracy": torch.cat(correct, -1).float().mean(-1), "min_margin": mg.min(-1).values,
            "mean_margin": mg.mean(-1)}


def with_embedding_noise(W: dict[str, Tensor], N: int, block: int, n_blocks: int, norm: float,
                         gen: torch.Generator) -> dict[str, Tensor]:
    """Copy of W with Gaussian noise of expected norm ``norm`` added to each of the first n_blocks
    blocks of the N subject embeddings (per-coordinate std norm/sqrt(block))."""
    W = {k: v.clone() for k, v in W.items()}
    W["W_E"][:N, :n_blocks * block] += torch.randn(N, n_blocks * block, generator=gen, dtype=W["W_E"].dtype) * norm / math.sqrt(block)
    return W
