import os
import sys
from collections.abc import Iterator

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter; it must be chosen before
# anything imports triton. The dispatch still picks PyTorch on the CPU unless a test forces
# CODA_GQA_L_KERNELS=triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests compile the kernels' default block shapes only; autotuning every variant takes minutes.
os.environ.setdefault("CODA_GQA_L_AUTOTUNE", "0")

sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# pytest-xdist's workers (``pytest -n 2``, the README's command) share the machine's cores: one torch thread each
TORCH_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2


@pytest.fixture(autouse=True)
def _deterministic_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(TORCH_THREADS)
    # coda-db's main sets it for the processes it starts; a test that calls main in-process must not leak it
    monkeypatch.delenv("CODA_GQA_L_THREADS", raising=False)


@pytest.fixture(autouse=True)
def _float32_dots_back_to_default() -> Iterator[None]:
    # a CUDA neural database chooses three-TF32 float32 tiles for its process: not for the tests that follow it
    yield
    from coda_gqa_l.kernels import dispatch

    dispatch.set_float32_dots(None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many cases each fuzzing property tried (tests/test_fuzz.py), when it ran."""
    fuzz = sys.modules.get("test_fuzz")
    cases = getattr(fuzz, "FUZZ_CASES", None)
    if cases:
        terminalreporter.write_sep("-", f"fuzzing: {sum(cases.values())} cases")
        for name, count in sorted(cases.items()):
            terminalreporter.write_line(f"{count:6d}  {name}")
