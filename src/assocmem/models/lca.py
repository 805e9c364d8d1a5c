"""One-layer, single-head, attention-only model of the LCA paper, stacked over S instances.

Every parameter carries a leading instance dimension S, so S seeds of one shape train as one
batched model (S = 1 is a single run). Per instance s, with h_l = W_E[x_l] (no positional
encoding, no residual, no LayerNorm, no MLP, no output projection):

    q = W_Q h_L,  k_l = W_K h_l,  v_l = W_V h_l          (v_l = h_l for identity W_V)
    a_l = softmax_l(q . k_l / sqrt(d))                     (only the last query is used)
    o = sum_l a_l v_l,  logits = W_E o                     (tied unembedding W_U = W_E)

Shapes: W_E [S, V+1, d]; W_Q, W_K, W_V [S, d, d]; tokens x [S, B, L]; logits [S, B, V+1].
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..blas import matmul as _mm
from ..tasks.lca import counts as token_counts
from .init import linear_init


class LCAModel(nn.Module):
    def __init__(self, W_E: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor | None, *,
                 train_embeddings: bool = True, uniform_attention: bool = False):
        super().__init__()
        self.S, self.vocab_size, self.d_model = W_E.shape
        self.W_E = nn.Parameter(W_E, requires_grad=train_embeddings)
        self.uniform_attention = uniform_attention
        self.W_Q = nn.Parameter(W_Q, requires_grad=not uniform_attention)
        self.W_K = nn.Parameter(W_K, requires_grad=not uniform_attention)
        self.W_V = None if W_V is None else nn.Parameter(W_V)

    @classmethod
    def init(cls, S: int, vocab_size: int, d: int, generators: list[torch.Generator], *,
             identity_W_V: bool = False, train_embeddings: bool = True,
             uniform_attention: bool = False) -> LCAModel:
        """Initialise instance s from ``generators[s]``: W_E ~ N(0,1), then W_Q, W_K, W_V ~ U(+-1/sqrt d)."""
        assert len(generators) == S
        E, Q, K, Vm = [], [], [], []
        for g in generators:
            E.append(torch.randn(1, vocab_size, d, generator=g))
            Q.append(linear_init((1, d, d), d, g))
            K.append(linear_init((1, d, d), d, g))
            Vm.append(linear_init((1, d, d), d, g))
        W_Q, W_K = torch.cat(Q), torch.cat(K)
        if uniform_attention:
            W_Q, W_K = torch.zeros_like(W_Q), torch.zeros_like(W_K)
        return cls(torch.cat(E), W_Q, W_K, None if identity_W_V else torch.cat(Vm),
                   train_embeddings=train_embeddings, uniform_attention=uniform_attention)

    # --- attention scores over the vocabulary ------------------------------------------------
    def score_table(self) -> Tensor:
        """[S, V+1, V+1] attention logits q(query token) . k(key token) / sqrt(d)."""
        Qv = self.W_E @ self.W_Q.transpose(1, 2)
        Kv = self.W_E @ self.W_K.transpose(1, 2)
        return Qv @ Kv.transpose(1, 2) / math.sqrt(self.d_model)

    # --- forward paths -----------------------------------------------------------------------
    def forward_plain(self, x: Tensor) -> Tensor:
        """Reference full-sequence forward. x [S, B, L] -> logits [S, B, V+1]."""
        S = self.S
        h = self.W_E[torch.arange(S, device=x.device)[:, None, None], x]                 # [S, B, L, d]
        q = torch.einsum("sed,sbd->sbe", self.W_Q, h[:, :, -1])          # [S, B, d]   q = W_Q h_L
        k = torch.einsum("sed,sbld->sble", self.W_K, h)                  # [S, B, L, d]
        v = h if self.W_V is None else torch.einsum("sed,sbld->sble", self.W_V, h)
        scores = torch.einsum("sbd,sbld->sbl", q, k) / math.sqrt(self.d_model)
        a = torch.softmax(scores, dim=-1)
        o = torch.einsum("sbl,sbld->sbd", a, v)
        return o @ self.W_E.transpose(1, 2)

    def forward_counts(self, c: Tensor, last: Tensor) -> Tensor:
        """Exact count-based forward: o depends only on token counts and the query token.

        c [S, B, K] float counts of tokens 0..K-1 in x_1..x_L (the last token included); tokens >= K
        must not occur (the samplers never emit the unknown token, so they pass K = V and the unknown
        key is skipped). last [S, B] query ids.
        o = sum_v a_v W_V E[v] with a_v = c_v e^{s_v} / sum_u c_u e^{s_u}, s_v = score(last, v): the
        softmax over positions grouped by token. The exponentials come from one [V+1, K] table per
        step, e^{score - row max}, so a sequence costs a gather, a product and a normalisation.
        With M = values @ W_E^T [S, K, V+1] built once per step, logits = a @ M: one B x K x (V+1)
        product per step instead of L x d^2 work per sequence.
        tests/test_lca_model.py proves equal logits and gradients to :meth:`forward_plain`.
        """
        return self._count_forward(c, last)[0]

    def _count_forward(self, c: Tensor, last: Tensor) -> tuple[Tensor, SimpleNamespace]:
        """Logits [S, B, V+1] of :meth:`forward_counts` and the intermediates that
        :meth:`count_loss_backward` reuses. One projection E [W_Q; W_K; W_V]^T serves all three maps."""
        S, B, K = c.shape
        V1, d = self.vocab_size, self.d_model
        E, attn = self.W_E, not self.uniform_attention
        f = SimpleNamespace(mats=([self.W_Q, self.W_K] if attn else []) + ([self.W_V] if self.W_V is not None else []),
                            scale=1.0 / math.sqrt(d), via_d=2 * d < V1)   # via_d: (a @ values) @ W_E^T is cheaper
        f.W_cat = torch.cat(f.mats, 1) if f.mats else None                                 # [S, n d, d]
        f.P = _mm(E, f.W_cat.transpose(1, 2)) if f.mats else None                          # [S, V+1, n d]
        f.Vv = f.P[:, :K, -d:] if self.W_V is not None else E[:, :K]                       # [S, K, d] values
        if attn:
            f.Qv, f.Kv = f.P[..., :d], f.P[:, :K, d:2 * d]
            table = _mm(f.Qv, f.Kv.transpose(1, 2)).mul_(f.scale)                          # [S, V+1, K]
            f.rows = (last + torch.arange(S, device=last.device)[:, None] * V1).view(-1)
            w = torch.exp(table - table.amax(-1, keepdim=True))                            # in (0, 1]
            w = w.view(S * V1, K).index_select(0, f.rows).view(S, B, K).mul_(c)
            norm = w.sum(-1, keepdim=True)
            if bool((norm == 0).any()):   # every present token's e^(s - max) underflowed: shift per row
                s = table.view(S * V1, K).index_select(0, f.rows).view(S, B, K)
                f.a = torch.softmax(s.add_(torch.log(c)), dim=-1)
            else:
                f.a = w.div_(norm)
        else:
            f.a = c / c.sum(-1, keepdim=True)
        if f.via_d:
            f.o = _mm(f.a, f.Vv)                                                           # [S, B, d]
            return _mm(f.o, E.transpose(1, 2)), f
        f.M = _mm(f.Vv, E.transpose(1, 2))                                                 # [S, K, V+1]
        return _mm(f.a, f.M), f

    @torch.no_grad()
    def count_loss_backward(self, c: Tensor, last: Tensor, t: Tensor, need_loss: bool = True) -> Tensor | None:
        """Training step of the count path with hand-written gradients: the per-instance mean
        cross-entropy of :meth:`forward_counts` against targets t [S, B], returned as [S] (None
        unless ``need_loss``: the gradient does not need it), with its gradient written into
        ``.grad`` of every trainable parameter. The same maths as autograd through
        :meth:`forward_counts` (tests/test_lca_model.py proves equal grads to the plain path), in
        fewer passes: the softmax cross-entropy gradient p - onehot(t) formed in place, the 1/B of
        the mean applied to the small [S, K, .] products, no autograd graph.
        """
        S, B, K = c.shape
        V1, d = self.vocab_size, self.d_model
        E, attn = self.W_E, not self.uniform_attention
        z, f = self._count_forward(c, last)
        a, Vv, mats = f.a, f.Vv, f.mats
        # cross-entropy and B times its gradient, G = softmax(z) - onehot(t)
        flat_t = (t + torch.arange(S * B, device=t.device).view(S, B) * V1).view(-1)
        loss = None
        if need_loss:
            z_t = z.view(-1).index_select(0, flat_t).view(S, B)
            loss = (torch.logsumexp(z, -1) - z_t).mean(1)
        G = torch.softmax(z, -1)
        G.view(-1).index_add_(0, flat_t, torch.full_like(flat_t, -1.0, dtype=G.dtype))
        inv_B = 1.0 / B
        if f.via_d:
            dE = _mm(G.transpose(1, 2), f.o).mul_(inv_B)                                   # [S, V+1, d]
            do = _mm(G, E)
            da = _mm(do, Vv.transpose(1, 2))                                               # [S, B, K] (x B)
            dVv = _mm(a.transpose(1, 2), do).mul_(inv_B)                                   # [S, K, d]
        else:
            dM = _mm(a.transpose(1, 2), G).mul_(inv_B)                                     # [S, K, V+1]
            da = _mm(G, f.M.transpose(1, 2))                                               # [S, B, K] (x B)
            dVv = _mm(dM, E)
            dE = _mm(dM.transpose(1, 2), Vv)
        if mats:
            dP = torch.zeros_like(f.P)
        if attn:
            ds = torch._softmax_backward_data(da, a, -1, a.dtype)                     # (x B)
            dtable = torch.zeros(S * V1, K, dtype=ds.dtype, device=ds.device)
            dtable = dtable.index_add_(0, f.rows, ds.view(S * B, K)).view(S, V1, K).mul_(f.scale * inv_B)
            dP[..., :d] = _mm(dtable, f.Kv)
            dP[:, :K, d:2 * d] = _mm(dtable.transpose(1, 2), f.Qv)
        if self.W_V is not None:
            dP[:, :K, -d:] = dVv
        else:
            dE[:, :K] += dVv
        if mats:
            dE += _mm(dP, f.W_cat)
            dW = _mm(dP.transpose(1, 2), E)                                                # [S, n d, d]
            for W, g in zip(mats, dW.split(d, 1)):
                W.grad = g
        if E.requires_grad:
            E.grad = dE
        return loss

    def forward(self, x: Tensor, path: str = "count") -> Tensor:
        """x [S, B, L] -> logits [S, B, V+1] via the ``count`` (default) or ``plain`` path."""
        if path == "plain":
            return self.forward_plain(x)
        return self.forward_counts(token_counts(x, self.vocab_size), x[..., -1])

    def attention_map(self, n_real: int) -> Tensor:
        """[S, n, n] softmax_j(q_i . k_j / sqrt d) over the first n real tokens fed as one unmasked
        sequence (rows = queries sum to 1): the cluster heat map."""
        s = self.score_table()[:, :n_real, :n_real]
        return torch.softmax(s, dim=-1)
