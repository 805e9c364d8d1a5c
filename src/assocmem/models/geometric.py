"""One-layer transformer for geometric factual recall, stacked over S independent instances.

Every weight carries a leading instance dimension S, so S seeds (or S same-shaped models) train as one
batched model; instance i only ever touches slice i. Row-vector convention: ``x @ W``.

Weights (the usual names; constructions in ``theory.geometric`` load directly)::

    W_E   [S, V, d]       token embeddings            W_pos [S, L, d]   absolute positions
    W_Q   [S, H, d, d_h]  queries (1/sqrt(d_h) applied in forward)
    W_K   [S, H, d, d_h]  keys     W_V [S, H, d, d_h]  values     W_O [S, H, d_h, d]  output
    W_1   [S, d, m], b_1 [S, m]    MLP in:  h = ReLU(x W_1 + b_1)
    W_2   [S, m, d]                MLP out: h W_2 (no output bias)
    W_U   [S, n_out, d]            unembedding over answers: logits = z W_U^T

Forward at the output positions P (one layer, so only those positions need the MLP)::

    x     = W_E[tokens] + W_pos[:T]                        [S, B, T, d]
    a     = causal multi-head attention(LN(x)) at P         [S, B, P, d]
    y     = x[P] + a
    z     = y + MLP(LN(y))
    logits = LN(z) W_U^T                                    [S, B, P, n_out]

LayerNorm (pre-LN, no affine parameters) only when ``layernorm=True``; default off [ours].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

WEIGHT_NAMES = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "W_1", "b_1", "W_2", "W_U")


def _ln(x: Tensor, on: bool) -> Tensor:
    return nn.functional.layer_norm(x, x.shape[-1:]) if on else x


class StackedTransformer(nn.Module):
    """S one-layer transformers with identical shapes, evaluated in one batched pass."""

    def __init__(self, S: int, V: int, L: int, d: int, H: int, d_h: int, m: int, n_out: int,
                 layernorm: bool = False):
        super().__init__()
        self.S, self.V, self.L, self.d, self.H, self.d_h, self.m, self.n_out = S, V, L, d, H, d_h, m, n_out
        self.layernorm = layernorm
        z = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731
        self.W_E, self.W_pos = z(S, V, d), z(S, L, d)
        self.W_Q, self.W_K, self.W_V = z(S, H, d, d_h), z(S, H, d, d_h), z(S, H, d, d_h)
        self.W_O = z(S, H, d_h, d)
        self.W_1, self.b_1, self.W_2 = z(S, d, m), z(S, m), z(S, m, d)
        self.W_U = z(S, n_out, d)

    # ---- initialisation / loading ------------------------------------------------------------
    @torch.no_grad()
    def init_instance(self, i: int, gen: torch.Generator, emb_std: float | None = None,
                      w2_scale: float = 0.1) -> None:
        """Initialise instance i from ``gen`` alone (fixed draw order, so a member equals a single run).

        Embeddings, positions and W_U ~ N(0, 1/d) (``emb_std`` overrides the std); attention and W_1
        ~ N(0, 1/fan_in); W_2 ~ N(0, 1/m) * w2_scale; b_1 = 0 [ours].
        """
        d = self.d
        es = emb_std if emb_std is not None else 1 / math.sqrt(d)
        for name, std in (("W_E", es), ("W_pos", es), ("W_Q", 1 / math.sqrt(d)), ("W_K", 1 / math.sqrt(d)),
                          ("W_V", 1 / math.sqrt(d)), ("W_O", 1 / math.sqrt(self.H * self.d_h)),
                          ("W_1", 1 / math.sqrt(d)), ("W_2", w2_scale / math.sqrt(self.m)), ("W_U", es)):
            p = getattr(self, name)
            p[i] = torch.randn(p.shape[1:], generator=gen) * std
        self.b_1[i] = 0.0

    @torch.no_grad()
    def load_instance(self, i: int, weights: dict[str, Tensor]) -> None:
        """Copy unstacked weights (shapes without the leading S) into instance i."""
        for name in WEIGHT_NAMES:
            if name in weights:
                p = getattr(self, name)
                p[i] = torch.as_tensor(weights[name], dtype=p.dtype)

    def instance_weights(self, i: int) -> dict[str, Tensor]:
        return {n: getattr(self, n)[i].detach().clone() for n in WEIGHT_NAMES}

    @classmethod
    def from_weights(cls, weights: dict[str, Tensor], layernorm: bool = False,
                     dtype: torch.dtype = torch.float32) -> StackedTransformer:
        """A model with S = 1 holding the given (unstacked) weights; shapes are read off them."""
        V, d = weights["W_E"].shape
        H, _, d_h = weights["W_Q"].shape
        model = cls(1, V, weights["W_pos"].shape[0], d, H, d_h, weights["W_1"].shape[1],
                    weights["W_U"].shape[0], layernorm).to(dtype)
        model.load_instance(0, weights)
        return model

    # ---- forward -----------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [S, B, T] (or [B, T], shared) -> residual stream x [S, B, T, d]."""
        if tokens.dim() == 2:
            tokens = tokens.expand(self.S, *tokens.shape)
        S, B, T = tokens.shape
        # one flat table [S*V, d]: F.embedding's backward is much faster than advanced indexing
        flat = tokens + self.V * torch.arange(S, device=tokens.device)[:, None, None]
        x = nn.functional.embedding(flat, self.W_E.reshape(S * self.V, self.d))
        return x + self.W_pos[:, None, :T]

    def attend(self, x: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Attention output at positions start..stop-1 (causal): ([S, B, P, d], pattern [S, B, H, P, stop])."""
        xn = _ln(x[:, :, :stop], self.layernorm)
        q = torch.einsum("sbtd,shde->sbhte", xn[:, :, start:stop], self.W_Q) / math.sqrt(self.d_h)
        k = torch.einsum("sbtd,shde->sbhte", xn, self.W_K)
        v = torch.einsum("sbtd,shde->sbhte", xn, self.W_V)
        scores = q @ k.transpose(-1, -2)                                 # [S, B, H, P, stop]
        qpos = torch.arange(start, stop, device=x.device)[:, None]
        kpos = torch.arange(stop, device=x.device)[None, :]
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        pattern = scores.softmax(-1)
        out = torch.einsum("sbhpt,sbhte,shed->sbpd", pattern, v, self.W_O)
        return out, pattern

    def mlp_hidden(self, y: Tensor) -> Tensor:
        """ReLU(LN(y) W_1 + b_1): [S, B, P, d] -> [S, B, P, m]."""
        yn = _ln(y, self.layernorm)
        return torch.relu(torch.einsum("sbpd,sdm->sbpm", yn, self.W_1) + self.b_1[:, None, None])

    def final_residual(self, tokens: Tensor, out_pos: tuple[int, int], x: Tensor | None = None) -> Tensor:
        """Residual z [S, B, P, d] at the output positions (``x`` overrides the embedded input)."""
        start, stop = out_pos
        if x is None:
            x = self.embed(tokens)
        a, _ = self.attend(x, start, stop)
        y = x[:, :, start:stop] + a
        h = self.mlp_hidden(y)
        return y + torch.einsum("sbpm,smd->sbpd", h, self.W_2)

    def forward(self, tokens: Tensor, out_pos: tuple[int, int], x: Tensor | None = None) -> Tensor:
        """Logits [S, B, P, n_out] at positions out_pos = (start, stop)."""
        z = _ln(self.final_residual(tokens, out_pos, x), self.layernorm)
        return torch.einsum("sbpd,sod->sbpo", z, self.W_U)


# Shifted logits (logit - row max) are raised to this floor before exp: e^-50 ~ 2e-22 is far below what
# any row sum (>= 1) resolves in fp32 or fp64, and high enough that the softmax, its products with the
# loss scale (>= ~1e-9) in the backward and those with the weights stay normal floats. Inputs to exp
# below about -87 and denormal operands of mul or the BLAS cost 10-50x per element on x86 CPUs
# (flush-to-zero is a per-thread CPU flag that torch's worker threads do not share).
EXP_FLOOR = -50.0


class UnembedCrossEntropy(torch.autograd.Function):
    """Fused unembedding + cross-entropy: per-query loss lse(z W_U^T) - (z W_U^T)[target].

    Equal to ``F.cross_entropy(z @ W_U^T, target, reduction="none")`` (tested) but makes fewer passes over
    the [S, B, n_out] logits, which dominate a full-batch step at large N: the softmax is formed in
    place in the logits buffer and kept for the backward pass (no separate log-softmax, zero-filled
    gradient or nll buffers). Three CPU costs are avoided: the logits are one matrix product per
    instance (a batched product with a small inner d runs about 3x slower on MKL), accuracy compares
    the target's logit with the maximum of the others (no argmax pass; ties resolved as argmax
    does), and logits more than EXP_FLOOR below their row's maximum are raised to that floor before
    ``exp`` (late in training most logits are there).

    z [S, B, d], W_U [S, n_out, d], target [S, B] long (IGNORE = -1 rows give loss 0 and no gradient)
    -> (loss [S, B], correct [S, B] bool or None).
    """

    @staticmethod
    def forward(ctx, z: Tensor, W_U: Tensor, target: Tensor, with_acc: bool):  # type: ignore[override]
        logits = z.new_empty(*z.shape[:2], W_U.shape[1])                   # [S, B, n_out]
        for i in range(z.shape[0]):
            torch.mm(z[i], W_U[i].t(), out=logits[i])
        tgt = target.clamp_min(0)[..., None]
        true = logits.gather(2, tgt)                                        # [S, B, 1]
        other = logits.scatter_(2, tgt, -math.inf).amax(2, keepdim=True)    # max over the other answers
        logits.scatter_(2, tgt, true)
        mx = torch.maximum(true, other)
        true = true[..., 0]
        correct = None
        if with_acc:                                                        # argmax == target
            correct = true > other[..., 0]
            tied = true == other[..., 0]                                    # argmax takes the first maximum
            if tied.any():
                correct[tied] = logits[tied].argmax(-1) == target[tied]
        p = logits.sub_(mx).clamp_(min=EXP_FLOOR).exp_()                    # unnormalised softmax, in place
        se = p.sum(2)
        loss = (mx[..., 0] + se.log() - true) * (target >= 0)
        ctx.save_for_backward(p, se, z, W_U, target)
        ctx.mark_non_differentiable(*(() if correct is None else (correct,)))
        return loss, correct

    @staticmethod
    def backward(ctx, g_loss: Tensor, _g_correct=None):  # type: ignore[override]
        p, se, z, W_U, target = ctx.saved_tensors
        scale = g_loss * (target >= 0) / se                                 # [S, B]
        p.mul_(scale[..., None])                                            # softmax * upstream gradient
        p.scatter_add_(2, target.clamp_min(0)[..., None], -(g_loss * (target >= 0))[..., None])
        g_z = torch.bmm(p, W_U) if ctx.needs_input_grad[0] else None
        g_U = torch.bmm(p.transpose(1, 2), z) if ctx.needs_input_grad[1] else None
        return g_z, g_U, None, None


def unembed_cross_entropy(z: Tensor, W_U: Tensor, target: Tensor, with_acc: bool = True
                          ) -> tuple[Tensor, Tensor | None]:
    """See :class:`UnembedCrossEntropy`; z [S, B, d] -> (loss [S, B], correct [S, B] or None)."""
    return UnembedCrossEntropy.apply(z, W_U, target, with_acc)
