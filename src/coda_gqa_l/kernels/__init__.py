"""Triton kernels with PyTorch references (docs/kernels.md).

``dispatch.backend(device)`` picks which one runs: Triton on CUDA, the PyTorch reference
elsewhere; the environment variable ``CODA_GQA_L_KERNELS`` (``auto``, ``triton`` or ``torch``)
forces either. On a CPU, ``triton`` needs ``TRITON_INTERPRET=1`` set before Triton is imported.
``CODA_GQA_L_UNBOUNDED_ATTENTION`` (``sdpa``, the default, or ``fused``) picks how unbounded differential
self-attention runs on the Triton backend (``dispatch.unbounded_path``).
"""

from .dispatch import BACKEND_ENV, UNBOUNDED_ENV, backend, triton_available, unbounded_path

__all__ = ["BACKEND_ENV", "UNBOUNDED_ENV", "backend", "triton_available", "unbounded_path"]
