"""How many CPU threads torch uses for the command-line tools.

Torch's default is one thread per core. On a small machine that another process keeps busy, its
OpenMP threads wait on each other and the work slows several times over; one thread fewer than
the cores that are free does not (``benchmarks/cpu_threads.py`` measures both; benchmarks/results/speed.md, "CPU
threads"). ``set_cpu_threads`` takes, in order: the ``--threads`` a user gave, ``$CODA_GQA_L_THREADS``,
torch's own choice when the user set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, else the cores
not already busy (the cores this process may use, less the one-minute load average, at least 1).
"""

from __future__ import annotations

import logging
import os

THREADS_ENV = "CODA_GQA_L_THREADS"
log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the platform says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """The cores not already busy: usable cores less the one-minute load average, at least 1."""
    cores = usable_cores()
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows
        busy = 0
    return max(1, min(cores, cores - busy))


def chosen_threads(requested: int | None = None) -> int | None:
    """The thread count to use (see the module docstring); None leaves torch's choice alone."""
    from_flag = requested is not None  # the environment also carries a parent's choice to its children
    if requested is None and os.environ.get(THREADS_ENV, "").strip():
        text = os.environ[THREADS_ENV].strip()
        if not text.isdigit():
            raise ValueError(f"${THREADS_ENV} must be a whole number of threads, got {text!r}")
        requested = int(text)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"need at least 1 CPU thread, got {requested}")
        # measured: 2 threads on 1 free core ingest 3x slower than 1 thread
        if from_flag and requested > (free := default_threads()):
            log.warning(
                "%d CPU threads asked for, but only %d of %d cores are free: beside a busy process the bounded "
                "model slows down several times over; fewer threads are faster (benchmarks/results/speed.md)",
                requested, free, usable_cores(),
            )  # fmt: skip
        return requested
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return None
    return default_threads()


def set_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads as ``chosen_threads`` says and return the count in use."""
    import torch

    threads = chosen_threads(requested)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
