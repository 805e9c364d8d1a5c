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


class _Layer1Attention(torch.autograd.Function):
    """a1 = softmax_s(score1(t, s) [+ bias_ts]) over s <= t from the [S,R,R] table K, with a
    hand-written backward: the gradient of K is reduced straight from dscores (a scatter over key
    tokens, index-adds over query tokens, sums over the batch), where autograd through the gathers
    would zero-fill and scatter [S,B,T,R]-sized buffers."""

    @staticmethod
    def forward(ctx, K: Tensor, bias: Tensor | None, z: Tensor, N: int, ape: bool) -> Tensor:
        S, B, T = z.shape
        z_key = z[:, :, None, :].expand(S, B, T, T)                      # z_s at [., t, s]
        G = gather_rows(K[:, :N, :N], z)                                 # [S,B,T,N]  K[z_t, n]
        if ape:
            G = G.add_(K[:, None, N:N + T, :N])                          # + K[N+t, n]
            sc = gather_rows(K[:, :N, N:N + T], z)                       # K[z_t, N+s]
            sc.add_(K[:, None, N:N + T, N:N + T]).add_(torch.gather(G, 3, z_key))
        else:
            sc = torch.gather(G, 3, z_key)
        if bias is not None:
            sc.add_(bias[:, None])
        future = torch.ones(T, T, dtype=torch.bool, device=z.device).triu(1)
        a1 = torch.softmax(sc.masked_fill_(future, float("-inf")), -1)
        ctx.save_for_backward(a1, z)
        ctx.N, ctx.ape, ctx.R, ctx.has_bias = N, ape, K.shape[1], bias is not None
        return a1

    @staticmethod
    def backward(ctx, da1: Tensor):
        a1, z = ctx.saved_tensors
        N, ape, R = ctx.N, ctx.ape, ctx.R
        S, B, T = z.shape
        ds = torch._softmax_backward_data(da1, a1, -1, a1.dtype)         # 0 at future positions (a1 = 0)
        D = torch.zeros(S, B, T, N, dtype=ds.dtype, device=ds.device)
        D.scatter_add_(3, z[:, :, None, :].expand(S, B, T, T), ds)       # sum_s ds[t, s] [z_s = n]
        rows = (z + torch.arange(S, device=z.device)[:, None, None] * N).view(-1)   # query token z_t
        dK = torch.zeros(S, R, R, dtype=ds.dtype, device=ds.device)
        dK[:, :N, :N] = torch.zeros(S * N, N, dtype=ds.dtype, device=ds.device).index_add_(
            0, rows, D.view(-1, N)).view(S, N, N)
        ds_sum = ds.sum(1) if ape or ctx.has_bias else None             # [S,T,T] over the batch
        if ape:
            dK[:, N:N + T, :N] = D.sum(1)
            dK[:, :N, N:N + T] = torch.zeros(S * N, T, dtype=ds.dtype, device=ds.device).index_add_(
                0, rows, ds.view(-1, T)).view(S, N, T)
            dK[:, N:N + T, N:N + T] = ds_sum
        return dK, ds_sum if ctx.has_bias else None, None, None, None


def layer1_attention(m: SimplifiedInduction, z: Tensor) -> Tensor:
    """Layer-1 attention softmax_s(c x_t^T W_K^1 x_s [+ b_{t-s}]) over s <= t: [S,B,T,T]."""
    T = z.shape[-1]
    F = torch.cat([m.W_E, m.P[:, :T]], 1) if m.uses_ape else m.W_E      # [S,R,d]
    K = (F @ m.W_K1) @ F.transpose(1, 2) * m._c()                         # [S,R,R]
    bias = None
    if m.pos == "rel_bias":
        off = (torch.arange(T, device=z.device)[:, None] - torch.arange(T, device=z.device)[None, :]).clamp(min=0)
        bias = m.b_rel[:, off]                                            # [S,T,T]
    return _Layer1Attention.apply(K, bias, z, m.N, m.uses_ape)


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


def loss_logits(m: SimplifiedInduction, z: Tensor, qpos: Tensor | None = None, return_attn: bool = False):
    """Logits [S,B,Q,N] at query positions qpos [S,B,Q] (None = all); equals m(z, qpos). With
    ``return_attn`` also the attention hooks {"attn1": [S,B,T,T], "attn2": [S,B,Q,T]}."""
    if not supports_fast(m):
        if not return_attn:
            return m(z, qpos)
        lg, hk = m(z, qpos, return_hooks=True)
        return lg, {"attn1": hk["attn1"], "attn2": hk["attn2"]}
    S, B, T = z.shape
    if T > m.n_ctx:
        raise ValueError(f"sequence length {T} exceeds n_ctx={m.n_ctx}")
    a1 = layer1_attention(m, z)
    h1 = layer1_output(m, z, a1)                                          # [S,B,T,d]
    if qpos is None:
        q2 = h1
        allowed = torch.ones(T, T, dtype=torch.bool, device=z.device).tril()
    else:
        q2 = torch.gather(h1, 2, qpos[..., None].expand(-1, -1, -1, m.d_model))
        allowed = torch.arange(T, device=z.device) <= qpos[..., None]    # [S,B,Q,T]
    r = _rowmm(q2, m.W_K2 * m._c())                                       # rows c q^T W_K^2
    s2 = matmul(r, h1.transpose(-1, -2))
    if m.l2_log_T:
        s2 = s2 * m.l2_scale(T, qpos, z.device)
    a2 = s2.masked_fill_(~allowed, float("-inf")).softmax(-1)
    U_res = m.W_U if m.ffn == "none" else m.W_U + m.W_U @ m.W_F           # [S,N,d]
    U_att = U_res @ m.W_O2 @ m.W_V2                                       # [S,N,d]
    logits = _rowmm(q2, U_res.transpose(1, 2)) + matmul(a2, _rowmm(h1, U_att.transpose(1, 2)))
    return (logits, {"attn1": a1, "attn2": a2}) if return_attn else logits
