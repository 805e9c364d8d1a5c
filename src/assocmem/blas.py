"""Exact fp32 matrix products on the CPU, single-threaded, through the faster of two BLAS routes.

PyTorch's CPU wheels multiply with MKL (or oneDNN); numpy brings OpenBLAS, which picks its kernels for
the CPU when it loads (``OPENBLAS_CORETYPE`` overrides the choice). Which one is faster for the small
batched products of single-threaded training depends on the machine (MKL takes a generic path on
AMD CPUs; OpenBLAS's kernels differ by CPU generation). So the route is measured, not assumed:
:func:`route` times both on a few products shaped like the LCA and induction training steps the
first time it is needed on a machine, takes numpy only if it is more than 5% faster (:func:`choose`),
caches the answer in the user's cache folder
(``blas-route.json``, keyed by CPU model, torch, numpy and OpenBLAS versions and kernels) and reuses
it. ``ASSOCMEM_BLAS=numpy|torch`` overrides it; every sweep records the route in its runs' meta.

:func:`matmul` uses the numpy route only when torch runs single-threaded (tiny models, the forked
halves of a stack, sweep workers): with several torch threads, OpenBLAS's and torch's spinning thread
pools fight over the cores (benchmarks/induction_speed.py shows it). numpy's BLAS is kept at one
thread. Both routes compute the same fp32 products in another summation order.
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor

ROUTES = ("numpy", "torch")
# calibration products (batch, n, k, m): the LCA count path's [S, V, d] x [d, d] at m = 6..8, d = 64..256,
# and the induction step's [B*T, d] x [d, d] products at d = 256
SHAPES = ((1, 65, 64, 64), (4, 257, 256, 256), (1, 2048, 256, 256))
_route: str | None = None      # decided once per process (forked children inherit it)
_one_thread = False            # numpy's BLAS set to one thread (once per process; forked children inherit it)


def _np_threads_one() -> None:
    global _one_thread
    if not _one_thread:
        import threadpoolctl
        for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers:
            lib.set_num_threads(1)
        _one_thread = True


def machine_key() -> dict[str, str]:
    """What the faster route depends on: CPU model, library versions, OpenBLAS's kernels."""
    import numpy as np
    import threadpoolctl
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
            for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    return {"cpu": cpu, "torch": torch.__version__, "numpy": np.__version__, "blas": "; ".join(blas),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "")}


def measure(repeat: int = 5, inner: int = 8, timer: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per route for ``inner`` passes over :data:`SHAPES` (best of ``repeat``, after one
    warm-up pass), torch at one thread. The routes take turns, so a machine that speeds up or slows
    down meanwhile (other jobs, clock changes) weighs on both alike. About half a second in all."""
    import numpy as np
    _np_threads_one()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(b, n, k, generator=g), torch.randn(b, k, m, generator=g)) for b, n, k, m in SHAPES]
    calls = {"numpy": lambda a, b: np.matmul(a.numpy(), b.numpy()), "torch": lambda a, b: a @ b}
    try:
        for fn in calls.values():
            for a, b in pairs:
                fn(a, b)
        out = {name: float("inf") for name in calls}
        for _ in range(repeat):
            for name, fn in calls.items():
                t0 = timer()
                for _ in range(inner):
                    for a, b in pairs:
                        fn(a, b)
                out[name] = min(out[name], timer() - t0)
        return out
    finally:
        torch.set_num_threads(threads)


MARGIN = 0.05   # numpy is chosen only when it is faster by more than this fraction


def choose(times: dict[str, float]) -> str:
    """The route for measured ``times``: numpy when it beats torch by more than :data:`MARGIN`, else
    torch. Within the margin the two are a tie for training speed, and a fixed answer keeps
    calibrations that land on either side of the tie from flipping the route between processes."""
    return "numpy" if times["numpy"] < (1.0 - MARGIN) * times["torch"] else "torch"


def route() -> str:
    """``numpy`` or ``torch``: ``$ASSOCMEM_BLAS`` if set, else :func:`choose` on this machine's
    :func:`measure` (measured once and cached under :func:`assocmem.io.cache_dir`)."""
    global _route
    if _route is None:
        _route = _decide()
    return _route


def _decide() -> str:
    forced = os.environ.get("ASSOCMEM_BLAS", "")
    if forced in ROUTES:
        return forced
    if forced:
        raise ValueError(f"ASSOCMEM_BLAS: {forced!r} is not allowed (allowed: {', '.join(ROUTES)}, or unset)")
    from . import io
    key = machine_key()
    path = io.cache_dir() / "blas-route.json"
    digest = io.content_hash({**key, "margin": MARGIN})      # a new rule measures again
    try:
        import json
        table = json.loads(path.read_text())
        if table.get(digest, {}).get("route") in ROUTES:
            return table[digest]["route"]
    except (OSError, ValueError, AttributeError):
        table = {}
    times = measure()
    choice = choose(times)
    table[digest] = {"route": choice, "seconds": times, "key": key}
    try:
        io.atomic_write_json(path, table)
    except OSError:          # a read-only cache: measured again next time
        pass
    return choice


def _np_matmul(a: Tensor, b: Tensor) -> Tensor:
    import numpy as np
    _np_threads_one()
    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def _numpy_ok(a: Tensor, b: Tensor) -> bool:
    return (a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and torch.get_num_threads() == 1 and route() == "numpy")


class _Matmul(torch.autograd.Function):
    """a @ b with both products of the backward pass through numpy too (equal batch shapes)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _np_matmul(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = g.contiguous() if g.stride(-1) != 1 and g.stride(-2) != 1 else g
        ga = _np_matmul(g, b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        gb = _np_matmul(a.transpose(-1, -2), g) if ctx.needs_input_grad[1] else None
        return ga, gb


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for [..., n, k] x [..., k, m] tensors: through numpy's BLAS for CPU float32 tensors
    (with autograd when needed, if both have the same batch shape), else torch. Strided views (e.g.
    transposes) are passed as they are."""
    if not _numpy_ok(a, b):
        return a @ b
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        if a.dim() < 2 or a.shape[:-2] != b.shape[:-2]:
            return a @ b
        return _Matmul.apply(a, b)
    return _np_matmul(a, b)
