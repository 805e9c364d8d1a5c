"""Fast training forward of the simplified induction model: logits at the loss positions only, and
no [T, d]-sized activation anywhere.

Same maths as ``SimplifiedInduction.naive_forward`` (tested to fp32 rounding on logits and the
gradients of every trained parameter), arranged so that every product over d has a per-step
table or the Q query positions on one side, never all T positions of every sequence.

Tables (:func:`step_tables`, built once per training step).  F = [W_E; P_{:T}] (rows f_i, R = N+T;
no APE: F = W_E, R = N) and G = F M1^T with the frozen value map M1 = W_O^1 W_V^1.  The residual
x0_t = C_t F has the coefficient row C_t = onehot(z_t) [+ onehot(N+t)]; layer 1 adds a1_t C G, so

    h1 = C F + a1 C G,    a1 C = [a1 @ onehot(z) | a1]   [T, R].

Layer 1 (scores without touching d).  One [R,R] table with the trainable W_K^1,

    K_ij = c f_i^T W_K^1 f_j,    score1(t,s) = K[z_t,z_s] + K[z_t,N+s] + K[N+t,z_s] + K[N+t,N+s]

(no P: only the first term, plus the relative bias b_{t-s}); the [S,B,T,T] scores are gathers from
the per-query rows K[z_t,:] + K[N+t,:] -- O(B T^2) memory work, no d (``_Layer1Attention``).

Layer 2 at the Q query positions only (``_Layer2``).  h1 enters layer 2 only through linear maps,
so with W = c W_K^2 and the tables TF, TG = F [W | U_res^T], G [W | U_res^T] [R, d+N]:

    [r | U_res h1]_q = C_q TF + (a1 C)_q TG            [Q, d+N]   (r = c W_K^2^T h1_q)
    s2 = r h1^T = (r F^T) C^T + ((r G^T) C^T) a1^T     [Q, T]
    logits = U_res h1_q + a2 (h1 U_att^T),   h1 U_att^T = C (F U_att^T) + a1 C (G U_att^T)   [T, N]

with a2 = softmax_{s<=t}(s2), U_res = W_U (no FFN) or W_U (I + W_F) (linear FFN on the residual) and
U_att = U_res W_O^2 W_V^2 [N, d].  C^T products are gathers over the token bins plus the position part
as it is, C products scatters.  The backward is written out (``_Layer2.backward``): the [T, T]
gradient of a1 is one GEMM ([dh1U | ds2^T] [VU | rV]^T) plus a row index-add, and the gradients go to
the tables, whose own backward to W_K^2, W_O^2, W_F runs once per step.

Causality.  A query at t reads tokens 0..t only, so each block of queries (``qpos`` may be a tuple
of blocks, ``runners.induction_step.loss_positions`` cuts them by position) works on the prefix up
to its last query, and nothing after the last query of a chunk is computed.

Multiply-adds per sequence (fwd + bwd; Q_j queries of block j on a prefix of L_j positions,
R_j = N + L_j; T the chunk's prefix): 3 T^2 N for h1 U_att^T, and per query of block j 3 R_j (d+N)
([r | U_res h1] and its table gradient), 4 R_j d (r [F; G]^T and back), 2 L_j^2 + T^2 (the key scores
through a1, their gradient, and the [T, T] gradient GEMM), 3 L_j N (a2 h1 U_att^T); plus the tables
once per step. ``benchmarks/induction_speed.py`` adds them up.

Other variants (RoPE, MLP FFN, learned positions, FFN on the embedding) fall back to
``SimplifiedInduction.forward``.

Shapes: z [S,B,T] tokens, qpos [S,B,Q] query positions (None = all T), or a tuple of such blocks;
returns logits [S,B,Q,N] (blocks concatenated along Q).
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
    """a1 = softmax_s(score1(t, s) + base_ts) over s <= t from the [S,N,R] token rows of the table K,
    the [S,T,N] position rows K[N+t, :N] and base = K[N+t, N+s] + bias (-inf above the diagonal),
    with a hand-written backward: the gradient of K is reduced straight from dscores (a scatter
    over key tokens, index-adds over query tokens, sums over the batch), where autograd through the
    gathers would zero-fill and scatter [S,B,T,R]-sized buffers."""

    @staticmethod
    def forward(ctx, K_tok: Tensor, K_pos: Tensor | None, base: Tensor, z: Tensor) -> Tensor:
        N = K_tok.shape[1]
        G = gather_rows(K_tok[:, :, :N], z)                              # K[z_t, n]  [S,B,T,N]
        if K_pos is not None:
            G.add_(K_pos[:, None])                                       # + K[N+t, n]
        sc = _cols(G, z, N, False)                                        # K[z_t, z_s] + K[N+t, z_s]
        if K_pos is not None:
            sc.add_(gather_rows(K_tok[:, :, N:], z))                     # + K[z_t, N+s]
        a1 = torch.softmax(sc.add_(base[:, None]), -1)
        ctx.save_for_backward(a1, z)
        ctx.ape, ctx.N = K_pos is not None, N
        return a1

    @staticmethod
    def backward(ctx, da1: Tensor):
        a1, z = ctx.saved_tensors
        N = ctx.N
        ds = torch._softmax_backward_data(da1, a1, -1, a1.dtype)         # 0 at future positions (a1 = 0)
        D = _cols_t(ds, z, N)                                             # sum_s ds[t, s] [z_s = n]  [S,B,T,N]
        dK_tok = torch.cat([_tok_t(D, z, N), _tok_t(ds, z, N)], 2) if ctx.ape else _tok_t(D, z, N)
        dbase = ds.sum(1) if ctx.needs_input_grad[2] else None
        return dK_tok, D.sum(1) if ctx.ape else None, dbase, None


def _rowmm(x: Tensor, W: Tensor, out: Tensor | None = None, beta: float = 1.0) -> Tensor:
    """x [S,...,d_in] @ W [S,d_in,d_out] as one GEMM per instance -> [S,...,d_out]; with ``out``
    (a tensor or a view of one), out = beta out + x W in place."""
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    if out is None:
        return matmul(x3, W).view(*x.shape[:-1], W.shape[-1])
    out.view(x3.shape[0], -1, W.shape[-1]).baddbmm_(x3, W, beta=beta)
    return out


def _bmm_acc(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out += a @ b in place for [S,B,n,k] x [S,B,k,m] (views allowed; one batched GEMM)."""
    S, B = out.shape[:2]
    out.view(S * B, *out.shape[2:]).baddbmm_(a.reshape(S * B, *a.shape[2:]), b.reshape(S * B, *b.shape[2:]))
    return out


def _rowmm_t(x: Tensor, y: Tensor) -> Tensor:
    """sum over all rows of x^T y: x [S,...,a], y [S,...,b] -> [S,a,b] (a table's gradient)."""
    S = x.shape[0]
    return matmul(x.reshape(S, -1, x.shape[-1]).transpose(1, 2), y.reshape(S, -1, y.shape[-1]))


def _rows(table: Tensor, z: Tensor, N: int, ape: bool) -> Tensor:
    """C table: table [S,R,k] -> [S,B,T,k], row t = table[z_t] (+ table[N+t] with APE)."""
    tok = gather_rows(table[:, :N], z)
    return tok.add_(table[:, None, N:N + z.shape[-1]]) if ape else tok


def _tok_t(g: Tensor, z: Tensor, N: int) -> Tensor:
    """The token rows of C^T g summed over the batch: g [S,B,T,k] -> [S,N,k], sum of rows t with z_t = n."""
    S, k = g.shape[0], g.shape[-1]
    flat = (z + torch.arange(S, device=z.device)[:, None, None] * N).reshape(-1)
    return g.new_zeros(S * N, k).index_add_(0, flat, g.reshape(-1, k)).view(S, N, k)


def _rows_t(g: Tensor, z: Tensor, N: int, ape: bool) -> Tensor:
    """C^T g summed over the batch (the gradient of ``_rows``' table): g [S,B,T,k] -> [S,R,k]."""
    return torch.cat([_tok_t(g, z, N), g.sum(1)], 1) if ape else _tok_t(g, z, N)


def _cols(t: Tensor, z: Tensor, N: int, ape: bool) -> Tensor:
    """t C^T on the last axis: t [S,B,Q,R_L] -> [S,B,Q,L], L = z.shape[-1]."""
    S, B, Q, _ = t.shape
    L = z.shape[-1]
    out = torch.gather(t[..., :N], 3, z[:, :, None, :].expand(S, B, Q, L))
    return out.add_(t[..., N:N + L]) if ape else out


def _cols_t(t: Tensor, z: Tensor, N: int) -> Tensor:
    """The token part of t C: t [S,B,Q,L] -> [S,B,Q,N], sum over key positions s with z_s = n."""
    S, B, Q, L = t.shape
    return t.new_zeros(S, B, Q, N).scatter_add_(3, z[:, :, None, :].expand(S, B, Q, L), t)


def _prefix(FG: Tensor, R: int, RL: int) -> Tensor:
    """The rows of [F; G] [S,2R,d] that a prefix of L positions reads: [F_{:RL}; G_{:RL}] [S,2RL,d]."""
    return FG if RL == R else torch.cat([FG[:, :RL], FG[:, R:R + RL]], 1)


def _query_rows(a1: Tensor, qpos: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Rows of a1 [S,B,T,T] at qpos [S,B,Q], first L columns: (a1q [S,B,Q,L], flat row index)."""
    S, B, T, _ = a1.shape
    flat = (qpos + (torch.arange(S * B, device=qpos.device) * T).view(S, B, 1)).reshape(-1)
    return a1.reshape(S * B * T, T).index_select(0, flat)[:, :L].view(*qpos.shape, L), flat


class _Layer2(torch.autograd.Function):
    """Layer 2 and the unembedding at blocks of query positions (module docstring), from a1
    [S,B,T,T] and the trainable tables FGU = [F; G] U_att^T [S,2R,N], TF = F [W | U_res^T] and
    TG = G [W | U_res^T] [S,R,d+N] (W = c W_K^2); frozen FG = [F; G] [S,2R,d].
    Returns logits [S,B,sum Q_j,N] and the layer-2 attention [S,B,sum Q_j,T] (not differentiable)."""

    @staticmethod
    def forward(ctx, a1, FGU, TF, TG, FG, z, blocks, scales, want_attn):
        S, B, T = z.shape
        R, d = TF.shape[1], FG.shape[-1]
        N = FGU.shape[-1]
        ape = R > N
        VU = _rows(FGU[:, R:], z, N, ape)                                 # C (G U_att^T)  [S,B,T,N]
        h1U = _bmm_acc(_rows(FGU[:, :R], z, N, ape), a1, VU)              # h1 U_att^T
        logits, attn, saved = [], [], []
        for qpos, scale in zip(blocks, scales):
            L = int(qpos.max()) + 1                                        # the block's prefix
            RL, zL = N + (L if ape else 0), z[..., :L]
            a1q, _ = _query_rows(a1, qpos, L)
            a_tok = _cols_t(a1q, zL, N)                                    # a1q C = [a_tok | a1q]
            rl = _rows(TF, torch.gather(z, 2, qpos), N, False)             # [r | U_res h1] at the queries
            if ape:
                rl = _rowmm(a1q, TG[:, N:RL], out=rl + gather_rows(TF[:, N:], qpos))
            rl = _rowmm(a_tok, TG[:, :N], out=rl)                          # [S,B,Q,d+N]
            rFG = _rowmm(rl[..., :d], _prefix(FG, R, RL).transpose(1, 2))  # r f_i, r M1 f_i  [S,B,Q,2RL]
            rV = _cols(rFG[..., RL:], zL, N, ape)                          # r . v1_u  [S,B,Q,L]
            s2 = _bmm_acc(_cols(rFG[..., :RL], zL, N, ape), rV, a1[..., :L, :L].transpose(-1, -2))   # r . h1_s
            if scale is not None:
                s2 = s2 * scale
            a2 = s2.masked_fill_(torch.arange(L, device=z.device) > qpos[..., None], float("-inf")).softmax(-1)
            logits.append(_bmm_acc(rl[..., d:].contiguous(), a2, h1U[..., :L, :]))
            if want_attn:
                attn.append(torch.nn.functional.pad(a2, (0, T - L)))
            saved += [a_tok, a1q, rV, a2]
        ctx.save_for_backward(a1, TG, FG, z, VU, h1U, *blocks, *saved)
        ctx.scales, ctx.n = scales, len(blocks)
        attn = torch.cat(attn, 2) if want_attn else a1.new_empty(0)
        ctx.mark_non_differentiable(attn)
        return torch.cat(logits, 2) if len(logits) > 1 else logits[0], attn

    @staticmethod
    def backward(ctx, dlogits, _):
        a1, TG, FG, z, VU, h1U, *rest = ctx.saved_tensors
        blocks, saved = rest[:ctx.n], rest[ctx.n:]
        S, B, T = z.shape
        N, R, d = VU.shape[-1], TG.shape[1], FG.shape[-1]
        ape = R > N
        dh1U = torch.zeros_like(h1U)
        dTG = torch.zeros_like(TG)
        drl_all, keys = [], []
        for j, (qpos, scale, dlog) in enumerate(zip(blocks, ctx.scales, dlogits.split([b.shape[-1] for b in blocks], 2))):
            a_tok, a1q, rV, a2 = saved[4 * j:4 * j + 4]
            L = a2.shape[-1]
            RL, zL = N + (L if ape else 0), z[..., :L]
            dlog = dlog.contiguous()
            if L == T:
                _bmm_acc(dh1U, a2.transpose(-1, -2), dlog)
            else:
                dh1U[..., :L, :] += matmul(a2.transpose(-1, -2), dlog)
            ds2 = torch._softmax_backward_data(matmul(dlog, h1U[..., :L, :].transpose(-1, -2)), a2, -1, a2.dtype)
            if scale is not None:
                ds2 = ds2 * scale
            drV = matmul(ds2, a1[..., :L, :L])
            drl = torch.empty(*dlog.shape[:-1], d + N, dtype=dlog.dtype, device=dlog.device)   # d[r | U_res h1]
            drl[..., d:] = dlog
            dr, FGL = drl[..., :d], _prefix(FG, R, RL)                     # dr = d(rFG) [F_L; G_L]
            _rowmm(_cols_t(ds2, zL, N), FGL[:, :N], out=dr, beta=0.0)
            _rowmm(_cols_t(drV, zL, N), FGL[:, RL:RL + N], out=dr)
            if ape:
                _rowmm(ds2, FGL[:, N:RL], out=dr)
                _rowmm(drV, FGL[:, RL + N:], out=dr)
            dTG[:, :N] += _rowmm_t(a_tok, drl)
            da1q = _rowmm(drl, TG[:, N:RL].transpose(1, 2)) if ape else None           # [S,B,Q,L]
            da_tok = _rowmm(drl, TG[:, :N].transpose(1, 2))
            if ape:
                dTG[:, N:RL] += _rowmm_t(a1q, drl)
                da1q.add_(_cols(da_tok, zL, N, False))
            else:
                da1q = _cols(da_tok, zL, N, False)
            drl_all.append(drl)
            keys.append((ds2, rV, da1q, qpos))
        # one GEMM writes the [T, T] gradient of a1: values dh1U VU^T plus every block's keys ds2^T rV
        # (zero beyond the block's prefix), then the rows read at the queries
        pad = lambda t: torch.nn.functional.pad(t, (0, T - t.shape[-1]))  # noqa: E731
        lhs = torch.cat([dh1U] + [pad(k[0]).transpose(-1, -2) for k in keys], -1)   # [S,B,T,N+sum Q]
        rhs = torch.cat([VU.transpose(-1, -2)] + [pad(k[1]) for k in keys], -2)      # [S,B,N+sum Q,T]
        da1 = matmul(lhs, rhs)
        flat1 = da1.view(S * B * T, T)
        for _, rV, da1q, qpos in keys:
            L = rV.shape[-1]
            flat1[:, :L].index_add_(0, _query_rows(a1, qpos, L)[1], da1q.reshape(-1, L))
        dVU = matmul(a1.transpose(-1, -2), dh1U)
        dFGU = dh1U.new_zeros(S, 2 * R, N)                                 # tables may be longer than T
        RT = N + (T if ape else 0)
        dFGU[:, :RT], dFGU[:, R:R + RT] = _rows_t(dh1U, z, N, ape), _rows_t(dVU, z, N, ape)
        qs = torch.cat(blocks, -1)                                         # TF rows read at the queries
        offs = torch.arange(S, device=z.device)[:, None, None] * R
        drl = torch.cat(drl_all, 2).reshape(-1, TG.shape[-1])
        dTF = TG.new_zeros(S * R, TG.shape[-1]).index_add_(0, (torch.gather(z, 2, qs) + offs).reshape(-1), drl)
        if ape:
            dTF.index_add_(0, (qs + N + offs).reshape(-1), drl)
        return da1, dFGU, dTF.view(S, R, -1), dTG, None, None, None, None, None


def step_tables(m: SimplifiedInduction, T: int) -> dict[str, Tensor]:
    """The per-step tables of the fast forward for sequences of up to T positions, built from the
    parameters with autograd (module docstring): K_tok = K[:N] [S,N,R], K_pos = K[N:, :N] [S,T,N]
    (APE only), base = K[N:, N:] (APE) + bias (-inf above the diagonal, + b_{t-s}) [S,T,T],
    FGU = [F; G] U_att^T [S,2R,N], TF, TG = F, G [c W_K^2 | U_res^T] [S,R,d+N], and the frozen
    FG = [F; G] [S,2R,d]. A training step builds them once and backpropagates through them once
    (``runners.induction_step.chunked_step``)."""
    N = m.N
    F = torch.cat([m.W_E, m.P[:, :T]], 1) if m.uses_ape else m.W_E        # [S,R,d] frozen
    R = F.shape[1]
    K = (F @ m.W_K1) @ F.transpose(1, 2) * m._c()                         # [S,R,R]
    t = torch.arange(T, device=F.device)
    base = torch.zeros(T, T, device=F.device).masked_fill_(t[None, :] > t[:, None], float("-inf")).expand(m.S, T, T)
    if m.pos == "rel_bias":
        base = base + m.b_rel[:, (t[:, None] - t[None, :]).clamp(min=0)]
    FG = torch.cat([F, F @ (m.W_O1 @ m.W_V1).transpose(1, 2)], 1)         # [F; G], G = F M1^T  [S,2R,d]
    U_res = m.W_U if m.ffn == "none" else m.W_U + m.W_U @ m.W_F           # [S,N,d]
    TFG = _rowmm(FG, torch.cat([m.W_K2 * m._c(), U_res.transpose(1, 2)], 2))   # [F; G] [W | U_res^T]
    out = {"K_tok": K[:, :N], "base": K[:, N:, N:] + base if m.uses_ape else base,
           "FGU": _rowmm(FG, (U_res @ m.W_O2 @ m.W_V2).transpose(1, 2)), "TF": TFG[:, :R], "TG": TFG[:, R:], "FG": FG}
    if m.uses_ape:
        out["K_pos"] = K[:, N:, :N]
    return out


def loss_logits(m: SimplifiedInduction, z: Tensor, qpos: Tensor | tuple[Tensor, ...] | None = None,
                return_attn: bool = False, tables: dict[str, Tensor] | None = None):
    """Logits [S,B,Q,N] at query positions qpos [S,B,Q] (None = all; a tuple of blocks: logits of
    their concatenation along Q); equals m(z, qpos). With ``return_attn`` also the attention hooks
    {"attn1": [S,B,T,T], "attn2": [S,B,Q,T]}. ``tables``: :func:`step_tables` for at least T
    positions (default: built here)."""
    blocks = (qpos,) if qpos is None or isinstance(qpos, Tensor) else tuple(qpos)
    if not supports_fast(m):
        q = blocks[0] if len(blocks) == 1 else torch.cat(blocks, -1)
        if not return_attn:
            return m(z, q)
        lg, hk = m(z, q, return_hooks=True)
        return lg, {"attn1": hk["attn1"], "attn2": hk["attn2"]}
    S, B, T = z.shape
    if T > m.n_ctx:
        raise ValueError(f"sequence length {T} exceeds n_ctx={m.n_ctx}")
    if blocks[0] is None:
        blocks = (torch.arange(T, device=z.device).expand(S, B, T),)
    if not return_attn:                           # causal: nothing after the last query is read
        z = z[..., :max(int(b.max()) for b in blocks) + 1]
        T = z.shape[-1]
    tb = step_tables(m, T) if tables is None else tables
    Tb, N = tb["base"].shape[-1], m.N
    if Tb < T:
        raise ValueError(f"tables for {Tb} positions, sequences of {T}")
    a1 = _Layer1Attention.apply(tb["K_tok"][:, :, :N + T] if m.uses_ape else tb["K_tok"],
                                tb["K_pos"][:, :T] if m.uses_ape else None, tb["base"][:, :T, :T], z)   # [S,B,T,T]
    scales = tuple(m.l2_scale(T, b, z.device) if m.l2_log_T else None for b in blocks)
    logits, a2 = _Layer2.apply(a1, tb["FGU"], tb["TF"], tb["TG"], tb["FG"], z, blocks, scales, return_attn)
    return (logits, {"attn1": a1, "attn2": a2}) if return_attn else logits
