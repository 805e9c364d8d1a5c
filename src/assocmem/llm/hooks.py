"""Read and edit an unmodified Hugging Face causal LM through forward hooks.

Nothing here re-implements a model: every number comes from the model's own modules, caught on the way
through by ``register_forward_hook`` / ``register_forward_pre_hook``. :data:`ARCHS` maps a family
(``config.model_type``) to the module paths the hooks need:

==============  ==============  =====================  ============================  ===========  =========
family          layers          head outputs (input)   attention's residual write    MLP's write  final norm
==============  ==============  =====================  ============================  ===========  =========
llama, qwen2    model.layers    self_attn.o_proj       self_attn (output[0])         mlp          model.norm
gemma3_text     model.layers    self_attn.o_proj       post_attention_layernorm      post_ff_ln   model.norm
gpt2            transformer.h   attn.c_proj (Conv1D)   attn (output[0])              mlp          transformer.ln_f
==============  ==============  =====================  ============================  ===========  =========

Gemma-3 normalises each sublayer's output (``post_attention_layernorm``, ``post_feedforward_layernorm``)
before adding it to the residual stream, so its "attention write" is the post-norm output.

Shapes (one prompt, batch b, positions T, layers L, heads H, head size D, model width d):
``resid`` [L+1, b, T, d] (index 0: the input of layer 0, i.e. the embeddings; l+1: output of layer l),
``z`` [L, b, T, H, D] (each head's output = the input of the output projection, split by head),
``attn_out``/``mlp_out`` [L, b, T, d] (what each sublayer adds to the residual),
``pattern`` [L, b, H, T, T] (attention weights; needs eager attention), ``final_in`` [b, T, d] (input of
the final norm), ``logits_raw`` [b, T, V] (unembedding output, before any final logit soft-capping).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from ..config import ConfigError


@dataclasses.dataclass(frozen=True)
class Arch:
    layers: str           # path of the ModuleList of decoder layers
    o_proj: str           # inside a layer: the attention output projection (its input = head outputs)
    attn: str             # inside a layer: the attention module (output[1] = weights under eager attention)
    attn_out: str         # inside a layer: the module whose output is added to the residual by attention
    mlp_out: str          # inside a layer: the module whose output is added to the residual by the MLP
    input_norm: str       # inside a layer: the norm feeding attention
    v_proj: str           # inside a layer: value projection (for OV circuits)
    norm: str             # final norm
    unembed: str          # unembedding (lm_head)
    embed: str            # token embedding
    norm_kind: str        # "rms" (x/rms * w), "rms1p" (x/rms * (1+w), Gemma), "layer" (LayerNorm)
    conv1d: bool = False  # GPT-2 Conv1D weights are [in, out]
    post_attn_norm: str | None = None   # Gemma: norm applied to o_proj's output before the residual add


_LLAMA = Arch("model.layers", "self_attn.o_proj", "self_attn", "self_attn", "mlp", "input_layernorm",
              "self_attn.v_proj", "model.norm", "lm_head", "model.embed_tokens", "rms")
ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "gemma3_text": Arch("model.layers", "self_attn.o_proj", "self_attn", "post_attention_layernorm",
                        "post_feedforward_layernorm", "input_layernorm", "self_attn.v_proj", "model.norm",
                        "lm_head", "model.embed_tokens", "rms1p", post_attn_norm="post_attention_layernorm"),
    "gpt2": Arch("transformer.h", "attn.c_proj", "attn", "attn", "mlp", "ln_1", "attn.c_attn",
                 "transformer.ln_f", "lm_head", "transformer.wte", "layer", conv1d=True),
}


def arch_of(model) -> Arch:
    """The :class:`Arch` of ``model``; ConfigError for an unsupported family."""
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHS:
        raise ConfigError(f"model: architecture {mt!r} ({type(model).__name__}) is not supported by the "
                          f"mechanism hooks (allowed: {', '.join(ARCHS)})")
    return ARCHS[mt]


def get(module, path: str):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def dims(model) -> tuple[int, int, int]:
    """(layers L, heads H, head size D)."""
    c = model.config
    L = getattr(c, "num_hidden_layers", None) or c.n_layer
    H = getattr(c, "num_attention_heads", None) or c.n_head
    d = getattr(c, "hidden_size", None) or c.n_embd
    D = getattr(c, "head_dim", None) or d // H
    return L, H, D


def layers(model) -> list:
    return list(get(model, arch_of(model).layers))


def use_eager(model) -> None:
    """Switch to eager attention (the only path that returns attention weights)."""
    if getattr(model.config, "_attn_implementation", None) == "eager":
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def hooked(handles_fn: Callable[[], list]) -> Iterator[None]:
    handles = handles_fn()
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture(model, what=("resid", "z", "attn_out", "mlp_out", "pattern", "final_in", "logits_raw"),
            positions: slice | int | None = None) -> Iterator[dict]:
    """Record activations of every forward pass run inside the block (the last pass wins).

    ``positions`` keeps only those sequence positions (e.g. ``-1``) to save memory. Yields a dict that
    fills with tensors (detached, shapes in the module doc; stacked over layers on exit).
    """
    arch = arch_of(model)
    L, H, D = dims(model)
    if "pattern" in what:
        use_eager(model)
    lys = layers(model)
    store: dict[str, list] = {k: [None] * (L + 1 if k == "resid" else L) for k in what if k not in
                              ("final_in", "logits_raw")}
    out: dict = {}

    def pos(x, dim=1):
        x = x.detach()
        if positions is None:
            return x
        if isinstance(positions, int):
            return x.narrow(dim, positions % x.shape[dim], 1)
        return x[(slice(None),) * dim + (positions,)]

    def make():
        hs = []
        if "resid" in what:
            def pre0(mod, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                store["resid"][0] = pos(x)
            hs.append(lys[0].register_forward_pre_hook(pre0, with_kwargs=True))
        for i, ly in enumerate(lys):
            if "resid" in what:
                hs.append(ly.register_forward_hook(lambda m, a, o, i=i: store["resid"].__setitem__(
                    i + 1, pos(_first(o)))))
            if "z" in what:
                def zpre(m, args, i=i):
                    x = args[0]
                    store["z"][i] = pos(x.reshape(*x.shape[:-1], H, D))
                hs.append(get(ly, arch.o_proj).register_forward_pre_hook(zpre))
            if "attn_out" in what:
                hs.append(get(ly, arch.attn_out).register_forward_hook(lambda m, a, o, i=i: store[
                    "attn_out"].__setitem__(i, pos(_first(o)))))
            if "mlp_out" in what:
                hs.append(get(ly, arch.mlp_out).register_forward_hook(lambda m, a, o, i=i: store[
                    "mlp_out"].__setitem__(i, pos(_first(o)))))
            if "pattern" in what:
                def pat(m, a, o, i=i):
                    w = o[1] if isinstance(o, tuple) and len(o) > 1 else None
                    if w is None:
                        raise ConfigError("attention weights are not returned; load the model with "
                                          "attn_implementation='eager'")
                    store["pattern"][i] = pos(w, dim=2)
                hs.append(get(ly, arch.attn).register_forward_hook(pat))
        if "final_in" in what:
            hs.append(get(model, arch.norm).register_forward_pre_hook(
                lambda m, a: out.__setitem__("final_in", pos(a[0]))))
        if "logits_raw" in what:
            hs.append(get(model, arch.unembed).register_forward_hook(
                lambda m, a, o: out.__setitem__("logits_raw", pos(o))))
        return hs

    with hooked(make):
        yield out
    for k, v in store.items():
        if all(t is not None for t in v):
            out[k] = torch.stack(v)


@contextlib.contextmanager
def edit_heads(model, fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Edit head outputs inside the block: ``fn(layer, z)`` gets the o_proj input of that layer reshaped
    to [b, T, H, D] (a view; edit it in place or return a replacement) before the projection runs."""
    arch = arch_of(model)
    _, H, D = dims(model)

    def make():
        hs = []
        for i, ly in enumerate(layers(model)):
            def pre(m, args, i=i):
                x = args[0]
                z = x.reshape(*x.shape[:-1], H, D).clone()
                r = fn(i, z)
                z = z if r is None else r
                return (z.reshape(x.shape),) + tuple(args[1:])
            hs.append(get(ly, arch.o_proj).register_forward_pre_hook(pre))
        return hs

    with hooked(make):
        yield


def ablate_heads(model, heads: list[tuple[int, int]], means: torch.Tensor, position: int | None = None):
    """Context manager: replace head (l, h)'s output by ``means[l, h]`` ([L, H, D]) at every position
    (``position=None``) or one position. ``heads=[]`` changes nothing."""
    by_layer: dict[int, list[int]] = {}
    for lh in heads:
        by_layer.setdefault(int(lh[0]), []).append(int(lh[1]))

    def fn(layer, z):
        for h in by_layer.get(layer, ()):
            if position is None:
                z[..., h, :] = means[layer, h].to(z.dtype)
            else:
                z[:, position, h, :] = means[layer, h].to(z.dtype)
        return z
    return edit_heads(model, fn) if by_layer else contextlib.nullcontext()


def patch_heads(model, heads: list[tuple[int, int]], source: torch.Tensor, position: int = -1):
    """Context manager: set head (l, h)'s output at ``position`` to ``source[l, h]`` ([L, H, D], e.g. the
    last-position head outputs of another run)."""
    return ablate_heads(model, heads, source, position=position)


@contextlib.contextmanager
def patch_resid(model, layer: int, value: torch.Tensor, position: int = -1) -> Iterator[None]:
    """Replace the output of decoder layer ``layer`` at ``position`` by ``value`` ([d])."""
    ly = layers(model)[layer]

    def hook(m, a, o):
        x = _first(o).clone()
        x[:, position] = value.to(x.dtype)
        return (x,) + tuple(o[1:]) if isinstance(o, tuple) else x

    with hooked(lambda: [ly.register_forward_hook(hook)]):
        yield


# ------------------------------------------------------------------------------------- weights

def head_W_O(model, layer: int) -> torch.Tensor:
    """[H, D, d]: head h writes ``z_h @ W_O[h]`` (before any bias / Gemma post-norm)."""
    arch = arch_of(model)
    _, H, D = dims(model)
    w = get(layers(model)[layer], arch.o_proj).weight.detach()
    w = w if arch.conv1d else w.T                       # -> [H*D, d]
    return w.reshape(H, D, -1)


def o_bias(model, layer: int) -> torch.Tensor | None:
    b = getattr(get(layers(model)[layer], arch_of(model).o_proj), "bias", None)
    return None if b is None else b.detach()


def head_W_V(model, layer: int) -> torch.Tensor:
    """[H, d, D]: head h's value map ``x @ W_V[h]`` (grouped-query heads share their kv head's map)."""
    arch = arch_of(model)
    _, H, D = dims(model)
    m = get(layers(model)[layer], arch.v_proj)
    if arch.conv1d:                                      # c_attn: [d, 3d] -> value columns
        d = m.weight.shape[0]
        return m.weight.detach()[:, 2 * d:].reshape(d, H, D).permute(1, 0, 2)
    w = m.weight.detach().T                              # [d, KV*D]
    kv = w.shape[1] // D
    w = w.reshape(w.shape[0], kv, D).permute(1, 0, 2)   # [KV, d, D]
    return w.repeat_interleave(H // kv, dim=0)


def norm_scale(norm, x: torch.Tensor) -> torch.Tensor:
    """The per-row scale 1/rms(x) (RMSNorm) or 1/std(x) (LayerNorm) the norm module applies to ``x``."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    x = x.float()
    if isinstance(norm, torch.nn.LayerNorm):
        return torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_gain(model, norm) -> torch.Tensor:
    w = norm.weight.detach().float()
    return 1.0 + w if arch_of(model).norm_kind == "rms1p" else w


def frozen_final_direction(model, final_in: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, float]:
    """With the final norm's scale frozen at its value for ``final_in`` ([d]), the logit difference along
    unembedding direction ``u`` ([d]) is linear: ``w · c + const`` for any residual part c. Returns (w, const)."""
    arch = arch_of(model)
    norm = get(model, arch.norm)
    w = norm_scale(norm, final_in) * norm_gain(model, norm) * u.float()
    const = 0.0
    if arch.norm_kind == "layer":
        w = w - w.mean()                                   # LayerNorm centres its input
        if norm.bias is not None:
            const = float(norm.bias.detach().float() @ u.float())
    return w, const
