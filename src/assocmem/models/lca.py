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

import torch
from torch import Tensor, nn

from ..tasks.lca import counts as token_counts


def linear_init(S: int, d: int, g: torch.Generator) -> Tensor:
    """PyTorch's default bias-free Linear init, U(-1/sqrt(d), 1/sqrt(d)), for S instances."""
    return (torch.rand(S, d, d, generator=g) * 2 - 1) / math.sqrt(d)


def log_counts(c: Tensor) -> Tensor:
    """log of non-negative integer counts (log 0 = -inf) by table lookup: torch.log is ~15x slower
    on tensors with many zeros."""
    c = c.long()
    table = torch.log(torch.arange(int(c.max()) + 1, dtype=torch.float32, device=c.device))
    return table.index_select(0, c.view(-1)).view(c.shape)


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
            Q.append(linear_init(1, d, g))
            K.append(linear_init(1, d, g))
            Vm.append(linear_init(1, d, g))
        W_Q, W_K = torch.cat(Q), torch.cat(K)
        if uniform_attention:
            W_Q, W_K = torch.zeros_like(W_Q), torch.zeros_like(W_K)
        return cls(torch.cat(E), W_Q, W_K, None if identity_W_V else torch.cat(Vm),
                   train_embeddings=train_embeddings, uniform_attention=uniform_attention)

    # --- value rows and attention scores over the vocabulary -------------------------------
    def values(self) -> Tensor:
        """[S, V+1, d] value vector of every vocabulary token (W_V E[v])."""
        return self.W_E if self.W_V is None else self.W_E @ self.W_V.transpose(1, 2)

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

        c [S, B, V+1] integer counts of x_1..x_L (the last token included); last [S, B] query ids.
        o = sum_v a_v W_V E[v] with a = softmax(s + log c), s_v = score(last, v): the count-weighted
        softmax c_v e^{s_v} / sum c e^s (absent tokens get log 0 = -inf, weight 0). With
        M = values @ W_E^T [S, V+1, V+1] built once per step, logits = a @ M: one B x V x V product per
        step instead of L x d^2 work per sequence. tests/test_lca_model.py proves equal logits and
        gradients to :meth:`forward_plain`.
        """
        s = self.score_table().gather(1, last[..., None].expand(-1, -1, self.vocab_size))  # [S,B,V+1]
        a = torch.softmax(s + log_counts(c), dim=-1)
        if 2 * self.d_model < self.vocab_size:   # cheaper order when d is small: (a @ values) @ W_E^T
            return (a @ self.values()) @ self.W_E.transpose(1, 2)
        M = self.values() @ self.W_E.transpose(1, 2)
        return a @ M

    def forward(self, x: Tensor, path: str = "count") -> Tensor:
        """x [S, B, L] -> logits [S, B, V+1] via the ``count`` (default) or ``plain`` path."""
        if path == "plain":
            return self.forward_plain(x)
        return self.forward_counts(token_counts(x, self.vocab_size, torch.long), x[..., -1])

    def attention_map(self, n_real: int) -> Tensor:
        """[S, n, n] softmax_j(q_i . k_j / sqrt d) over the first n real tokens fed as one unmasked
        sequence (rows = queries sum to 1): the cluster heat map."""
        s = self.score_table()[:, :n_real, :n_real]
        return torch.softmax(s, dim=-1)
