"""Triton kernels with PyTorch references (SPEC 3).

``dispatch.backend(device)`` picks which one runs: Triton on CUDA, the PyTorch reference
elsewhere; the environment variable ``CODA_GQA_L_KERNELS`` (``auto``, ``triton`` or ``torch``)
forces either. On a CPU, ``triton`` needs ``TRITON_INTERPRET=1`` set before Triton is imported.
"""

from .dispatch import BACKEND_ENV, backend, triton_available

__all__ = ["BACKEND_ENV", "backend", "triton_available"]
