"""The paper's Figure 1: the model's top next tokens for a prompt, without and with a prepended
sentence ("The Eiffel Tower is not in Chicago.")."""
from __future__ import annotations

import torch

EIFFEL_PROMPT = "The Eiffel Tower is in the city of"
EIFFEL_CONTEXT = "The Eiffel Tower is not in Chicago."


@torch.no_grad()
def top_next_tokens(model, tokenizer, prompt: str, context: str | None = None, top: int = 5,
                    sep: str = " ") -> dict:
    """{"context", "text", "top": [(token string, probability), ...]} for ``context + sep + prompt``."""
    text = prompt if not context else context + sep + prompt
    ids = torch.tensor([tokenizer(text)["input_ids"]], device=next(model.parameters()).device)
    probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
    p, i = probs.topk(top)
    return {"context": context, "text": text,
            "top": [(tokenizer.decode([int(t)]), float(v)) for t, v in zip(i, p)]}
