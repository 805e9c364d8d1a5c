"""Devices, precisions and free memory for real-model inference.

``resolve_device`` and ``resolve_dtype`` turn user options into a concrete torch device string and
dtype, refusing (``ConfigError``, one line) what this machine cannot run: CUDA where there is none, a
CUDA index beyond the cards present, MPS where it is absent, or a dtype the device cannot compute in
(checked with a tiny matrix product on the device, e.g. bfloat16 on a CUDA card without native bf16).
"""
from __future__ import annotations

import functools
import re

import torch

from ..config import ConfigError

DEVICES = "auto, cpu, cuda, cuda:N, mps"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


def resolve_device(spec: str) -> str:
    """``auto`` (the current CUDA card when there is one, else ``cpu``), ``cpu``, ``cuda`` (the
    current card), ``cuda:N`` or ``mps`` -> a concrete device string such as ``"cpu"``, ``"cuda:0"``."""
    s = str(spec or "auto").strip().lower()
    if s == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m:
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {spec} (no CUDA device is available here; allowed: {DEVICES} "
                              "where present, e.g. cpu)")
        n = torch.cuda.device_count()
        idx = torch.cuda.current_device() if m.group(1) is None else int(m.group(1))
        if idx >= n:
            raise ConfigError(f"device: {spec} (this machine has {n} CUDA device(s): cuda:0..cuda:{n - 1})")
        return f"cuda:{idx}"
    if s == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device: {spec} (MPS is not available here; allowed: {DEVICES} where present)")
        return "mps"
    raise ConfigError(f"device: {spec} (allowed: {DEVICES})")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _checkpoint_dtype(value) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value if value in DTYPES.values() else None
    if isinstance(value, str):
        return DTYPES.get(ALIASES.get(value.removeprefix("torch."), value.removeprefix("torch.")))
    return None


@functools.lru_cache(maxsize=None)
def device_supports(device: str, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes natively in ``dtype`` (a small matmul runs; for CUDA bfloat16 the
    card must support it without emulation)."""
    if device.startswith("cuda") and dtype == torch.bfloat16:
        try:
            with torch.cuda.device(torch.device(device)):
                if not torch.cuda.is_bf16_supported(including_emulation=False):
                    return False
        except TypeError:   # older torch without including_emulation
            with torch.cuda.device(torch.device(device)):
                if not torch.cuda.is_bf16_supported():
                    return False
    try:
        a = torch.ones((4, 4), dtype=dtype, device=device)
        torch.softmax(a @ a, dim=-1)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def resolve_dtype(spec: str, device: str, checkpoint_dtype=None) -> torch.dtype:
    """``auto`` | ``float32`` | ``bfloat16`` | ``float16`` (aliases fp32/bf16/fp16) -> a torch dtype.

    ``auto``: float32 on CPU; elsewhere the checkpoint's own dtype (``checkpoint_dtype``: a torch
    dtype or its name, as in ``config.dtype``/``config.torch_dtype``), float32 when that is unknown
    or the device cannot run it. An explicit dtype the device cannot run is a ``ConfigError``."""
    s = str(spec or "auto").strip().lower()
    s = ALIASES.get(s, s)
    if s == "auto":
        if device == "cpu":
            return torch.float32
        ck = _checkpoint_dtype(checkpoint_dtype)
        return ck if ck is not None and device_supports(device, ck) else torch.float32
    if s not in DTYPES:
        raise ConfigError(f"dtype: {spec} (allowed: auto, {', '.join(DTYPES)})")
    if not device_supports(device, DTYPES[s]):
        raise ConfigError(f"dtype: {spec} (the device {device} cannot run it; allowed here: "
                          f"{', '.join(n for n, d in DTYPES.items() if device_supports(device, d))})")
    return DTYPES[s]


def free_memory_bytes(device: torch.device | str) -> tuple[int | None, str]:
    """Memory available for activations on ``device`` and where the number came from.

    CUDA: ``torch.cuda.mem_get_info`` free bytes plus what torch's caching allocator holds but does not
    use. CPU: ``MemAvailable`` from /proc/meminfo. Otherwise (None, reason)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + max(cached, 0)), "cuda.mem_get_info"
    if dev.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
        except OSError:
            pass
        return None, "unknown (no /proc/meminfo)"
    return None, f"unknown ({dev.type})"
