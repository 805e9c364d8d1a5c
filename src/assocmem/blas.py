"""Exact fp32 matrix products on the CPU through numpy's BLAS, for the hand-written training paths.

PyTorch's CPU wheels multiply with MKL, which takes its generic AVX2 code path on AMD processors.
numpy's bundled OpenBLAS is faster on the small batched products of the LCA count path: about 1.25x
with its AVX2 ("Haswell") kernels and about 2x with its AVX-512 ("SkylakeX") kernels on an AMD EPYC
(Zen 5), measured by benchmarks/lca_speed.py. OpenBLAS picks its kernels when it loads; on a CPU it
does not recognise it falls back to AVX2, and ``OPENBLAS_CORETYPE=SkylakeX`` asks for the AVX-512
ones (only on a CPU with AVX-512, and only with an OpenBLAS known to be correct on it).

:func:`matmul` multiplies CPU float32 tensors that need no autograd through numpy (zero-copy views;
the same fp32 maths in another summation order) and everything else through torch. numpy's BLAS
threads follow torch's thread count (so a forked single-threaded worker stays single-threaded).
``ASSOCMEM_BLAS=torch`` always uses torch.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

_USE_NUMPY = os.environ.get("ASSOCMEM_BLAS", "numpy") != "torch"
_libs = None          # threadpoolctl controllers of numpy's BLAS, found on first use
_threads = None       # the thread count last given to them


def _numpy_blas_threads(n: int) -> None:
    global _libs, _threads
    if _libs is None:
        import numpy  # noqa: F401 - loads the BLAS that threadpoolctl then finds
        import threadpoolctl
        _libs = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    if n != _threads:
        for lib in _libs:
            lib.set_num_threads(n)
        _threads = n


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for [..., n, k] x [..., k, m] tensors: through numpy's BLAS for CPU float32 tensors
    outside autograd, else torch. Strided views (e.g. transposes) are passed as they are."""
    if (_USE_NUMPY and a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        import numpy as np
        _numpy_blas_threads(torch.get_num_threads())
        return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))
    return a @ b
