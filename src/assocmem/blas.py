"""Exact fp32 matrix products on the CPU through numpy's BLAS, for single-threaded training.

PyTorch's CPU wheels multiply with MKL, which takes its generic AVX2 code path on AMD processors.
numpy's bundled OpenBLAS is faster there. On an AMD EPYC (Zen 5), single-threaded, it is about 1.25x
faster on the LCA count path's small batched products with its AVX2 ("Haswell") kernels and about
2x with its AVX-512 ("SkylakeX") kernels, and an induction training step takes 1.65 s (Haswell) or
1.27 s (SkylakeX) instead of 1.88 s (benchmarks/lca_speed.py, benchmarks/induction_speed.py).
OpenBLAS picks its kernels when it loads (``OPENBLAS_CORETYPE`` overrides the choice).

:func:`matmul` sends CPU float32 products through numpy (zero-copy views; the same fp32 maths in
another summation order; autograd-aware) when torch runs single-threaded: tiny models, the forked
halves of a stack, sweep workers. With several torch threads it uses torch, because OpenBLAS's and
torch's spinning thread pools fight over the cores (a 2-thread induction step took 3.1 s instead of
1.0 s). numpy's BLAS is kept at one thread. ``ASSOCMEM_BLAS=torch`` always uses torch.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

_USE_NUMPY = os.environ.get("ASSOCMEM_BLAS", "numpy") != "torch"
_one_thread = False   # numpy's BLAS set to one thread (once per process; forked children inherit it)


def _np_matmul(a: Tensor, b: Tensor) -> Tensor:
    global _one_thread
    import numpy as np
    if not _one_thread:
        import threadpoolctl
        for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers:
            lib.set_num_threads(1)
        _one_thread = True
    return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def _numpy_ok(a: Tensor, b: Tensor) -> bool:
    return (_USE_NUMPY and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dtype == b.dtype == torch.float32 and torch.get_num_threads() == 1)


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
