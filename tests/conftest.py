import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASSOCMEM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (../shared/data beside the checkout); tests using it skip if absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set ASSOCMEM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its tokenizer saved as a local model folder."""
    pytest.importorskip("transformers")
    from assocmem.llm.testing import tiny_model, tiny_tokenizer
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer(bos=True).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """The bundled CounterFact test records as a JSON file."""
    import json

    from assocmem.hijack.testing import records
    p = tmp_path_factory.mktemp("cf") / "cf.json"
    p.write_text(json.dumps(records()))
    return p
