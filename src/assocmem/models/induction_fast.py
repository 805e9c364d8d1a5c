"""Fast training forward of the simplified induction model: logits at the loss positions only.

Same maths as ``SimplifiedInduction.naive_forward`` (tested to 1e-5 on logits and gradients), but
arranged so that no [S,B,T,T,d]-sized product and no layer-2 work at unscored positions happens:

Layer 1 (scores without touching d).  With frozen tables F = [W_E; P_{:T}] (rows f_i, R = N+T rows)
and the trainable W_K^1, one [R,R] table per step

    K_ij = c f_i^T W_K^1 f_j,    score1(t,s) = K[z_t,z_s] + K[z_t,N+s] + K[N+t,z_s] + K[N+t,N+s]

(no P: only the first term, plus the relative bias b_{t-s}).  The [S,B,T,T] scores are two gathers
from the per-query rows K[z_t,:] + K[N+t,:] -- O(B T^2) memory work instead of O(B T^2 d) flops.

Layer-1 output.  With frozen value maps M1 = W_O^1 W_V^1, v1_s = (M1 w_E)(z_s) + M1 p_s, so

    h1_t = x0_t + (a1 @ onehot(z))_t @ (W_E M1^T) + (a1 @ (P M1^T))_t

(the token part is a scatter-add of a1 into N bins, then an [N,d] product).

Layer 2 at the Q query positions only, with the output side folded into N-space:

    r_t = h1_t^T W_K^2,  a2 = softmax_{s<=t}(c r_t . h1_s),
    logits_t = U_res h1_t + a2 @ (h1 @ U_att^T),   U_att = U_res W_O^2 W_V^2 [N,d],

U_res = W_U (no FFN) or W_U (I + W_F) (linear FFN on the residual).  Other variants (RoPE, MLP FFN,
learned positions, FFN on the embedding) fall back to ``SimplifiedInduction.forward``.

Shapes: z [S,B,T] tokens, qpos [S,B,Q] query positions (None = all T); returns logits [S,B,Q,N].
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..blas import matmul
from .induction import SimplifiedInduction, gather_rows

FAST_POS = ("ape", "ape_sinusoidal", "rel_bias", "none")


def supports_fast(m: SimplifiedInduction) -> bool:
    """Whether ``loss_logits`` uses the fast path for this model (else it calls ``m.forward``)."""
    return (m.pos in FAST_POS and (m.ffn == "none" or (m.ffn == "linear" and m.ffn_input == "residual"))
            and set(m.trainable) <= {"W_K1", "W_K2", "W_O2", "W_F", "b_rel"})


def layer1_scores(m: SimplifiedInduction, z: Tensor) -> Tensor:
    """Layer-1 scores c x_t^T W_K^1 x_s + [b_{t-s}], causal positions only finite: [S,B,T,T]."""
    S, B, T = z.shape
    N = m.N
    F = torch.cat([m.W_E, m.P[:, :T]], 1) if m.uses_ape else m.W_E      # [S,R,d]
    K = (F @ m.W_K1) @ F.transpose(1, 2) * m._c()                         # [S,R,R]
    rows = gather_rows(K, z)                                              # [S,B,T,R]  K[z_t, :]
    if m.uses_ape:
        rows = rows + K[:, None, N:N + T]                                 # + K[N+t, :]
    idx = z[:, :, None, :].expand(S, B, T, T)
    sc = torch.gather(rows[..., :N], 3, idx)                              # K[., z_s]
    if m.uses_ape:
        sc = sc.add_(rows[..., N:N + T])                                  # K[., N+s]
    if m.pos == "rel_bias":
        off = (torch.arange(T, device=z.device)[:, None] - torch.arange(T, device=z.device)[None, :]).clamp(min=0)
        sc = sc + m.b_rel[:, off][:, None]
    future = torch.ones(T, T, dtype=torch.bool, device=z.device).triu(1)
    return sc.masked_fill_(future, float("-inf"))


def _rowmm(x: Tensor, W: Tensor) -> Tensor:
    """x [S,...,d_in] @ W [S,d_in,d_out] as one GEMM per instance -> [S,...,d_out]."""
    return matmul(x.reshape(x.shape[0], -1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[-1])


def layer1_output(m: SimplifiedInduction, z: Tensor, a1: Tensor) -> Tensor:
    """h1 = x0 + a1 @ v1 with v1 = M1 x0 split into token bins and positions: [S,B,T,d]."""
    S, B, T = z.shape
    M1t = (m.W_O1 @ m.W_V1).transpose(1, 2)                               # [S,d,d] (frozen)
    a_tok = torch.zeros(S, B, T, m.N, dtype=a1.dtype, device=a1.device).scatter_add_(
        3, z[:, :, None, :].expand(S, B, T, T), a1)                       # a1 @ onehot(z)
    h1 = gather_rows(m.W_E, z) + _rowmm(a_tok, m.W_E @ M1t)
    if m.uses_ape:
        P = m.P[:, :T]
        h1 = h1 + P[:, None] + matmul(a1.reshape(S, B * T, T), P @ M1t).view(S, B, T, -1)
    return h1


def loss_logits(m: SimplifiedInduction, z: Tensor, qpos: Tensor | None = None) -> Tensor:
    """Logits [S,B,Q,N] at query positions qpos [S,B,Q] (None = all); equals m(z, qpos)."""
    if not supports_fast(m):
        return m(z, qpos)
    S, B, T = z.shape
    if T > m.n_ctx:
        raise ValueError(f"sequence length {T} exceeds n_ctx={m.n_ctx}")
    a1 = layer1_scores(m, z).softmax(-1)
    h1 = layer1_output(m, z, a1)                                          # [S,B,T,d]
    if qpos is None:
        q2 = h1
        allowed = torch.ones(T, T, dtype=torch.bool, device=z.device).tril()
    else:
        q2 = torch.gather(h1, 2, qpos[..., None].expand(-1, -1, -1, m.d_model))
        allowed = torch.arange(T, device=z.device) <= qpos[..., None]    # [S,B,Q,T]
    r = _rowmm(q2, m.W_K2 * m._c())                                       # rows c q^T W_K^2
    a2 = matmul(r, h1.transpose(-1, -2)).masked_fill_(~allowed, float("-inf")).softmax(-1)
    U_res = m.W_U if m.ffn == "none" else m.W_U + m.W_U @ m.W_F           # [S,N,d]
    U_att = U_res @ m.W_O2 @ m.W_V2                                       # [S,N,d]
    return _rowmm(q2, U_res.transpose(1, 2)) + matmul(a2, _rowmm(h1, U_att.transpose(1, 2)))
