"""Context hijacking (Jiang et al., "Do LLMs dream of elephants?", NeurIPS 2024) on CounterFact:
records and validation (:mod:`.counterfact`), schemes (:mod:`.schemes`), scoring and summaries
(:mod:`.evaluate`), the Figure 1 demo (:mod:`.demo`) and the ``assocmem hijack`` commands (:mod:`.cli`)."""
