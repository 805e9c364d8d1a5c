"""Models for the induction-head experiments, stacked over S independent instances (leading dim).

``SimplifiedInduction`` -- Birth's simplified two-layer attention-only model::

    x_t   = w_E(z_t) + p_t                                  (APE; RPE drops p_t)
    layer l = 1, 2:  x_t <- x_t + W_O^l sum_{s<=t} beta_ts W_V^l x_s,
                     beta_t. = softmax_s( c * x_t^T W_K^l x_s  [+ b_{t-s} for RPE bias, layer 1] )
                     (W_Q = identity; c = 1/sqrt(d) or 1)
    optional FFN:    x_t <- x_t + W_F x_t  (linear)  or  x_t + W_2 relu(W_1 x_t)
    logits xi_t = W_U x_t

Trainable by default: W_K1, W_K2, W_O2 (+ W_F / MLP, + learned positions or relative bias).
Frozen buffers: W_E [N, d], P [n_ctx, d], W_V1, W_O1, W_V2 [d, d], W_U [N, d].
All tensors carry a leading instance dim S, e.g. W_K1 [S, d, d]; member i of a stack equals the
single model built from the i-th generator.

Exact shortcuts (tested against the naive formula): frozen token/position tables are pushed through
the linear maps once per step (``(W_E W_K^T)[z]`` instead of ``x W_K^T``), and layer 2 is evaluated
only at the requested query positions ``qpos`` (the loss positions).

``GenericTransformer`` -- 2-layer pre-LayerNorm transformer (learned W_Q, W_K, W_V, W_O, ReLU FFN of
width 4d, final norm, learned token and absolute positions) for the attention-map figures.

Hook points (``return_hooks=True``): ``attn1`` [S,B,T,T], ``attn2`` [S,B,Q,T] (generic:
``attn{l}`` [S,B,H,T,T]), ``resid0``, ``resid1`` [S,B,T,d], ``resid2`` [S,B,Q,d].
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .init import linear_init

POS_KINDS = ("ape", "ape_learned", "ape_sinusoidal", "rope", "rel_bias", "none")
FFN_KINDS = ("none", "linear", "mlp")
ATTN_MATS = ("W_K1", "W_V1", "W_O1", "W_K2", "W_V2", "W_O2")


def sinusoidal(n: int, d: int) -> Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    i = torch.arange(0, d, 2, dtype=torch.float32)
    ang = pos / (10000 ** (i / d))
    out = torch.zeros(n, d)
    out[:, 0::2] = torch.sin(ang)
    out[:, 1::2] = torch.cos(ang)
    return out


def rope(x: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotary embedding on adjacent coordinate pairs; x [..., T, d] with position = index along T."""
    T, d = x.shape[-2], x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    ang = torch.arange(T, dtype=torch.float32, device=x.device)[:, None] * freq   # [T, d/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


def gather_rows(table: Tensor, idx: Tensor) -> Tensor:
    """table [S, M, d], idx [S, ...] -> [S, ..., d] (per-instance row lookup; an index_select of whole
    rows, several times faster on the CPU than torch.gather with a broadcast index)."""
    S, M, d = table.shape
    flat = (idx.reshape(S, -1) + torch.arange(S, device=idx.device)[:, None] * M).reshape(-1)
    return table.reshape(S * M, d).index_select(0, flat).view(*idx.shape, d)


def causal_mask(T: int, qpos: Tensor | None, device: torch.device | str = "cpu") -> Tensor:
    """Boolean mask of allowed keys: [T, T] (all queries) or [S, B, Q, T] (queries at qpos)."""
    s = torch.arange(T, device=qpos.device if qpos is not None else device)
    if qpos is None:
        return s[None, :] <= s[:, None]
    return s <= qpos[..., None]


class SimplifiedInduction(nn.Module):
    """Stacked simplified two-layer model; see the module docstring for the maths."""

    TRAINABLE_DEFAULT = ("W_K1", "W_K2", "W_O2")

    def __init__(self, generators: Sequence[torch.Generator], N: int, d_model: int = 256, n_ctx: int = 1024,
                 pos: str = "ape", ffn: str = "none", emb_scale: float = 1.0, scale_scores: bool = True,
                 tie_unembed: bool = False, ffn_input: str = "residual", trainable: Sequence[str] = (),
                 init_scale: float = 1.0):
        """init_scale multiplies the initial values of the trained attention matrices (W_K1, W_K2, W_O2 by
        default) after they are drawn: 1 = PyTorch's Linear init, 0 = zero init (Birth's top-down theory)."""
        super().__init__()
        if pos not in POS_KINDS:
            raise ValueError(f"pos: {pos!r} is not allowed (allowed: {', '.join(POS_KINDS)})")
        if ffn not in FFN_KINDS:
            raise ValueError(f"ffn: {ffn!r} is not allowed (allowed: {', '.join(FFN_KINDS)})")
        S, d = len(generators), d_model
        self.S, self.N, self.d_model, self.n_ctx = S, N, d, n_ctx
        self.pos, self.ffn, self.scale_scores, self.ffn_input = pos, ffn, scale_scores, ffn_input
        w: dict[str, list[Tensor]] = {}
        for g in generators:  # fixed draw order per member
            parts = {"W_E": torch.randn(N, d, generator=g) * emb_scale}
            P = torch.randn(n_ctx, d, generator=g)
            parts["P"] = sinusoidal(n_ctx, d) if pos == "ape_sinusoidal" else P
            for name in ("W_K1", "W_V1", "W_O1", "W_K2", "W_V2", "W_O2"):
                parts[name] = linear_init((d, d), d, g)
            parts["W_U"] = parts["W_E"] / math.sqrt(d) if tie_unembed else linear_init((N, d), d, g)
            if ffn == "linear":
                parts["W_F"] = linear_init((d, d), d, g)
            elif ffn == "mlp":
                parts["W_1"] = linear_init((4 * d, d), d, g)
                parts["W_2"] = linear_init((d, 4 * d), 4 * d, g)
            for k, v in parts.items():
                w.setdefault(k, []).append(v)
        trainable = set(trainable or self.TRAINABLE_DEFAULT)
        if ffn == "linear":
            trainable.add("W_F")
        elif ffn == "mlp":
            trainable |= {"W_1", "W_2"}
        if pos == "ape_learned":
            trainable.add("P")
        if pos == "rel_bias":
            w["b_rel"] = [torch.zeros(n_ctx) for _ in generators]
            trainable.add("b_rel")
        for k, v in w.items():
            t = torch.stack(v)
            if k in trainable and k in ATTN_MATS:
                t = t * init_scale
            if k in trainable:
                self.register_parameter(k, nn.Parameter(t))
            else:
                self.register_buffer(k, t)
        self.trainable = tuple(sorted(trainable & set(w)))
        self.l2_log_T = 0       # > 0: layer-2 scores at position t times max(1, log(t+1) / log(l2_log_T))

    # ---- pieces --------------------------------------------------------------------------
    @property
    def uses_ape(self) -> bool:
        return self.pos in ("ape", "ape_learned", "ape_sinusoidal")

    def _c(self) -> float:
        return 1.0 / math.sqrt(self.d_model) if self.scale_scores else 1.0

    def l2_scale(self, T: int, qpos: Tensor | None, device: torch.device | str = "cpu") -> Tensor | float:
        """Multiplier of the layer-2 scores per query position, [T, 1] or [S, B, Q, 1]: 1 without
        ``l2_log_T``; with it, max(1, log(t+1) / log l2_log_T), which leaves positions below
        l2_log_T (the training length) unchanged and keeps attention as sharp beyond it as the
        growing number of keys would otherwise blur it (a length-extrapolation remedy, C-13)."""
        if not self.l2_log_T:
            return 1.0
        t = torch.arange(T, device=device) if qpos is None else qpos
        return (torch.log(t.float() + 1) / math.log(self.l2_log_T)).clamp(min=1.0)[..., None]

    def embed(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Token part [S,B,T,d] and position part [S,1,T,d] (None without APE) of the residual."""
        T = z.shape[-1]
        e = gather_rows(self.W_E, z)
        p = self.P[:, None, :T] if self.uses_ape else None
        return e, p

    def layer1(self, z: Tensor, return_scores: bool = False):
        """Previous-token layer on all positions: (h1 [S,B,T,d], attn1 [S,B,T,T], x0 [S,B,T,d])."""
        S, B, T = z.shape
        if T > self.n_ctx:
            raise ValueError(f"sequence length {T} exceeds n_ctx={self.n_ctx}")
        e, p = self.embed(z)
        x0 = e if p is None else e + p
        M1 = self.W_O1 @ self.W_V1                                            # [S,d,d] frozen
        KE = self.W_E @ self.W_K1.transpose(1, 2)                             # rows w_E(k)^T W_K^T
        VE = self.W_E @ M1.transpose(1, 2)
        k1, v1 = gather_rows(KE, z), gather_rows(VE, z)
        if p is not None:
            Pt = self.P[:, :T]
            k1 = k1 + (Pt @ self.W_K1.transpose(1, 2))[:, None]
            v1 = v1 + (Pt @ M1.transpose(1, 2))[:, None]
        q1 = x0
        if self.pos == "rope":
            q1, k1 = rope(q1), rope(k1)
        sc = (q1 @ k1.transpose(-1, -2)) * self._c()                           # [S,B,T,T]
        if self.pos == "rel_bias":
            t = torch.arange(T, device=z.device)
            sc = sc + self.b_rel[:, (t[:, None] - t[None, :]).clamp(min=0)][:, None]
        sc = sc.masked_fill(~causal_mask(T, None, z.device), float("-inf"))
        a1 = sc.float().softmax(-1)
        h1 = x0 + a1 @ v1
        return (h1, a1, x0, sc) if return_scores else (h1, a1, x0)

    def forward(self, z: Tensor, qpos: Tensor | None = None, return_hooks: bool = False):
        """z [S,B,T] tokens; qpos [S,B,Q] query positions for layer 2 (None = all T).

        Returns logits [S,B,Q,N] (and a dict of hooks)."""
        S, B, T = z.shape
        h1, a1, x0 = self.layer1(z)
        if qpos is None:
            q2, e_q = h1, x0
        else:
            q2 = torch.gather(h1, 2, qpos[..., None].expand(-1, -1, -1, self.d_model))
            e_q = gather_rows(self.W_E, torch.gather(z, 2, qpos))
        r = q2 @ self.W_K2[:, None]                                              # (W_K2^T q)^T
        sc = (r @ h1.transpose(-1, -2)) * self._c() * self.l2_scale(T, qpos, z.device)   # [S,B,Q,T]
        sc = sc.masked_fill(~causal_mask(T, qpos, z.device), float("-inf"))
        a2 = sc.float().softmax(-1)
        h2 = q2 + (a2 @ h1) @ (self.W_O2 @ self.W_V2).transpose(1, 2)[:, None]
        if self.ffn != "none":
            src = h2 if self.ffn_input == "residual" else (e_q if qpos is not None else gather_rows(self.W_E, z))
            if self.ffn == "linear":
                h2 = h2 + src @ self.W_F.transpose(1, 2)[:, None]
            else:
                h2 = h2 + torch.relu(src @ self.W_1.transpose(1, 2)[:, None]) @ self.W_2.transpose(1, 2)[:, None]
        logits = h2 @ self.W_U.transpose(1, 2)[:, None]
        if return_hooks:
            return logits, {"attn1": a1, "attn2": a2, "resid0": x0, "resid1": h1, "resid2": h2}
        return logits

    def naive_forward(self, z: Tensor) -> Tensor:
        """Reference implementation without shortcuts (all positions); logits [S,B,T,N]."""
        S, B, T = z.shape
        c = self._c()
        x = self.W_E[torch.arange(S, device=z.device)[:, None, None], z]
        if self.uses_ape:
            x = x + self.P[:, None, :T]
        e = x if not self.uses_ape else x - self.P[:, None, :T]
        mask = causal_mask(T, None, z.device)
        for layer in (1, 2):
            WK, WV, WO = (getattr(self, f"W_{m}{layer}") for m in "KVO")
            k = torch.einsum("sij,sbtj->sbti", WK, x)
            q = x
            if layer == 1 and self.pos == "rope":
                q, k = rope(q), rope(k)
            sc = torch.einsum("sbti,sbui->sbtu", q, k) * c
            if layer == 2:
                sc = sc * self.l2_scale(T, None, z.device)
            if layer == 1 and self.pos == "rel_bias":
                t = torch.arange(T, device=z.device)
                sc = sc + self.b_rel[:, (t[:, None] - t[None, :]).clamp(min=0)][:, None]
            a = sc.masked_fill(~mask, float("-inf")).softmax(-1)
            x = x + torch.einsum("sij,sjk,sbuk,sbtu->sbti", WO, WV, x, a)
        if self.ffn == "linear":
            src = x if self.ffn_input == "residual" else e
            x = x + torch.einsum("sij,sbtj->sbti", self.W_F, src)
        elif self.ffn == "mlp":
            x = x + torch.einsum("sij,sbtj->sbti", self.W_2, torch.relu(torch.einsum("sij,sbtj->sbti", self.W_1, x)))
        return torch.einsum("sij,sbtj->sbti", self.W_U, x)


def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


class GenericTransformer(nn.Module):
    """Stacked generic pre-LN transformer (Birth's attention-map model); all weights trained.

    Per layer l: W_Q{l}, W_K{l}, W_V{l}, W_O{l} [S,d,d] (heads split d into H blocks), FFN W_1{l}
    [S,4d,d], W_2{l} [S,d,4d] (+biases), LayerNorms; final LayerNorm; W_E [S,N,d], P [S,n_ctx,d], W_U [S,N,d].
    """

    def __init__(self, generators: Sequence[torch.Generator], N: int, d_model: int = 128, n_ctx: int = 256,
                 n_layers: int = 2, n_heads: int = 1, pos: str = "ape_learned", parallel_ffn: bool = False):
        super().__init__()
        d = d_model
        self.S, self.N, self.d_model, self.n_ctx = len(generators), N, d, n_ctx
        self.n_layers, self.n_heads, self.parallel_ffn, self.pos = n_layers, n_heads, parallel_ffn, pos
        w: dict[str, list[Tensor]] = {}
        for g in generators:
            parts = {"W_E": torch.randn(N, d, generator=g) * 0.02,
                     "P": torch.randn(n_ctx, d, generator=g) * 0.02}
            for l in range(1, n_layers + 1):
                for m in "QKVO":
                    parts[f"W_{m}{l}"] = linear_init((d, d), d, g)
                parts[f"W_1{l}"] = linear_init((4 * d, d), d, g)
                parts[f"b_1{l}"] = linear_init((4 * d,), d, g)
                parts[f"W_2{l}"] = linear_init((d, 4 * d), 4 * d, g)
                parts[f"b_2{l}"] = linear_init((d,), 4 * d, g)
                for n in ("ln_a", "ln_f"):
                    parts[f"{n}{l}_w"], parts[f"{n}{l}_b"] = torch.ones(d), torch.zeros(d)
            parts["ln_w"], parts["ln_b"] = torch.ones(d), torch.zeros(d)
            parts["W_U"] = linear_init((N, d), d, g)
            for k, v in parts.items():
                w.setdefault(k, []).append(v)
        for k, v in w.items():
            t = torch.stack(v)
            if k == "P" and pos == "ape_sinusoidal":
                self.register_buffer(k, sinusoidal(n_ctx, d).expand(len(generators), -1, -1).clone())
            else:
                self.register_parameter(k, nn.Parameter(t))

    def forward(self, z: Tensor, return_hooks: bool = False):
        """z [S,B,T] -> logits [S,B,T,N] (and hooks attn{l} [S,B,H,T,T])."""
        S, B, T = z.shape
        H, d = self.n_heads, self.d_model
        dh = d // H
        x = gather_rows(self.W_E, z) + self.P[:, None, :T]
        mask = causal_mask(T, None, z.device)
        hooks = {"resid0": x}
        for l in range(1, self.n_layers + 1):
            p = lambda n: getattr(self, n)  # noqa: E731
            xa = _layer_norm(x, p(f"ln_a{l}_w")[:, None, None], p(f"ln_a{l}_b")[:, None, None])

            def proj(m):
                return (xa @ p(f"W_{m}{l}").transpose(1, 2)[:, None]).view(S, B, T, H, dh).transpose(2, 3)
            q, k, v = proj("Q"), proj("K"), proj("V")
            sc = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
            a = sc.masked_fill(~mask, float("-inf")).softmax(-1)              # [S,B,H,T,T]
            att = (a @ v).transpose(2, 3).reshape(S, B, T, d) @ p(f"W_O{l}").transpose(1, 2)[:, None]
            hooks[f"attn{l}"] = a
            xf_in = xa if self.parallel_ffn else None
            x = x + att
            if xf_in is None:
                xf_in = _layer_norm(x, p(f"ln_f{l}_w")[:, None, None], p(f"ln_f{l}_b")[:, None, None])
            hid = torch.relu(xf_in @ p(f"W_1{l}").transpose(1, 2)[:, None] + p(f"b_1{l}")[:, None, None])
            x = x + hid @ p(f"W_2{l}").transpose(1, 2)[:, None] + p(f"b_2{l}")[:, None, None]
            hooks[f"resid{l}"] = x
        x = _layer_norm(x, self.ln_w[:, None, None], self.ln_b[:, None, None])
        logits = x @ self.W_U.transpose(1, 2)[:, None]
        return (logits, hooks) if return_hooks else logits
