"""Tiny, randomly initialised causal LMs with a locally trained byte-level BPE tokenizer, for tests
and examples that must not touch the network."""
from __future__ import annotations

import torch

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.", "Do not think of English.",
    "The twin city of Lyon is Beirut.", "Paris is in France. Chicago is in America.",
    "The Eiffel Tower is in the city of Paris.", "Michael Jordan professionally plays the sport basketball.",
    "Toko Yasuda speaks the language Japanese.", "Autonomous University of Madrid is located in Spain.",
    "What sport does Thierry Henry play? They play soccer. Rome Tokyo Manila Dutch German Italian",
]


def tiny_tokenizer(bos: bool = False, vocab_size: int = 400):
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few sentences; ``bos=True`` prepends
    a BOS token like Llama-family tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(kind: str = "gpt2", vocab_size: int = 400, seed: int = 0):
    """A 2-layer random model: ``kind`` in gpt2, llama, gemma3."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=1, eos_token_id=2)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               max_position_embeddings=512, sliding_window=256, final_logit_softcapping=30.0)
    else:
        raise ValueError(f"kind: {kind!r} (allowed: gpt2, llama, gemma3)")
    torch.manual_seed(seed)  # transformers initialises from the global RNG; only used for test models
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init, so log-probs are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model
