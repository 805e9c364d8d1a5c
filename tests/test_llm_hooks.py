"""llm.hooks on tiny random models of every supported family: hooks change nothing, head outputs
add up to the attention output, edits that change nothing give the baseline."""
import pytest
import torch

from assocmem.config import ConfigError
from assocmem.llm import hooks
from assocmem.llm.testing import tiny_model

KINDS = ["gpt2", "llama", "gemma3", "qwen2"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])


def qwen2_tiny(seed=0):
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return m


def make(kind):
    m = qwen2_tiny() if kind == "qwen2" else tiny_model(kind)
    hooks.use_eager(m)
    return m


@pytest.mark.parametrize("kind", KINDS)
def test_capture_leaves_logits_unchanged_and_parts_add_up(kind):
    m = make(kind)
    with torch.no_grad():
        base = m(IDS).logits
        with hooks.capture(m) as c:
            out = m(IDS).logits
    assert torch.equal(base, out)
    L, H, D = hooks.dims(m)
    assert c["z"].shape == (L, 1, IDS.shape[1], H, D) and c["pattern"].shape == (L, 1, H, 7, 7)
    torch.testing.assert_close(c["pattern"].sum(-1), torch.ones(L, 1, H, 7))
    arch = hooks.arch_of(m)
    for layer in range(L):
        # residual stream: layer output = input + attention write + MLP write
        torch.testing.assert_close(c["resid"][layer + 1], c["resid"][layer] + c["attn_out"][layer]
                                   + c["mlp_out"][layer], atol=1e-5, rtol=1e-5)
        # head outputs x W_O (+ bias) summed over heads = the attention output (Gemma: before its post-norm)
        s = torch.einsum("btHD,HDd->btd", c["z"][layer], hooks.head_W_O(m, layer))
        if hooks.o_bias(m, layer) is not None:
            s = s + hooks.o_bias(m, layer)
        if arch.post_attn_norm:
            s = hooks.get(hooks.layers(m)[layer], arch.post_attn_norm)(s)
        torch.testing.assert_close(s, c["attn_out"][layer], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["final_in"], c["resid"][L])


@pytest.mark.parametrize("kind", KINDS)
def test_edits_that_change_nothing_give_the_baseline(kind):
    m = make(kind)
    L, H, D = hooks.dims(m)
    with torch.no_grad():
        base = m(IDS).logits
        with hooks.ablate_heads(m, [], torch.zeros(L, H, D)):
            assert torch.equal(m(IDS).logits, base)
        with hooks.capture(m, what=("z",), positions=-1) as c:
            m(IDS)
        src = c["z"][:, 0, 0]                                   # [L, H, D] at the last position
        every = [(l, h) for l in range(L) for h in range(H)]
        with hooks.patch_heads(m, every, src):                  # patching a run into itself
            torch.testing.assert_close(m(IDS).logits, base, atol=1e-5, rtol=1e-5)
        with hooks.ablate_heads(m, [(0, 1)], torch.zeros(L, H, D)):
            assert not torch.allclose(m(IDS).logits, base)


@pytest.mark.parametrize("kind", KINDS)
def test_patching_the_last_residual_reproduces_the_source_run(kind):
    m = make(kind)
    L, _, _ = hooks.dims(m)
    other = torch.tensor([[12, 13, 5, 14, 15, 9, 16, 17, 11]])
    with torch.no_grad():
        with hooks.capture(m, what=("resid",), positions=-1) as c:
            want = m(other).logits[0, -1]
        with hooks.patch_resid(m, L - 1, c["resid"][L, 0, 0]):
            got = m(IDS).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_one_config_error():
    class Cfg:
        model_type = "mamba"
    class M:
        config = Cfg()
    with pytest.raises(ConfigError, match="architecture 'mamba'.*allowed: llama, qwen2, gemma3_text, gpt2"):
        hooks.arch_of(M())
