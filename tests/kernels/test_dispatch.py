"""One dispatch: every choice between the Triton kernels and the PyTorch references is made in
kernels/dispatch.py, from environment variables read nowhere else."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coda_gqa_l.kernels import dispatch

SOURCE = Path(dispatch.__file__).resolve().parents[1]


def test_the_kernel_settings_are_read_in_dispatch_only() -> None:
    names = {dispatch.BACKEND_ENV, dispatch.UNBOUNDED_ENV, dispatch.AUTOTUNE_ENV, dispatch.FP32_DOTS_ENV}
    readers = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                readers.add(path.relative_to(SOURCE).as_posix())
    assert readers == {"kernels/dispatch.py"}
    # and no module outside dispatch compares backends itself (``backend(x) == "triton"``): it asks
    # dispatch for a decision by name; reporting which backend ran (a summary's field) is no choice
    choosers = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(_calls_backend(side) for side in (node.left, *node.comparators)):
                choosers.add(path.relative_to(SOURCE).as_posix())
    assert choosers == {"kernels/dispatch.py"}


def _calls_backend(node: ast.expr) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "backend") or (
        isinstance(func, ast.Attribute) and func.attr == "backend"
    )


@pytest.mark.parametrize(
    ("kernels", "unbounded", "expected"),
    [
        # (differential, cached prefix, padded) -> plan, for each setting
        ("torch", "sdpa", {(True, False, False): "reference", (True, True, False): "reference"}),
        (
            "triton",
            "sdpa",
            {
                (True, False, False): "sdpa",
                (True, False, True): "sdpa",
                (True, True, False): "fused",
                (True, True, True): "reference",
                (False, False, False): "reference",
            },
        ),  # fmt: skip
        (
            "triton",
            "fused",
            {
                (True, False, False): "fused",
                (True, True, False): "fused",
                (True, False, True): "reference",
                (False, True, False): "reference",
            },
        ),  # fmt: skip
    ],
)
def test_unbounded_attention_plans(
    monkeypatch: pytest.MonkeyPatch, kernels: str, unbounded: str, expected: dict[tuple[bool, bool, bool], str]
) -> None:
    """On the CPU the Triton path is the interpreter's (conftest sets TRITON_INTERPRET=1)."""
    if kernels == "triton" and not dispatch.triton_available():
        pytest.skip("Triton is not installed")
    monkeypatch.setenv(dispatch.BACKEND_ENV, kernels)
    monkeypatch.setenv(dispatch.UNBOUNDED_ENV, unbounded)
    for (differential, prefix, padded), plan in expected.items():
        assert dispatch.unbounded_attention("cpu", differential, prefix, padded) == plan
    triton = kernels == "triton"
    assert dispatch.use_triton("cpu") is triton and dispatch.fused_bounded_chunk("cpu") is triton
    assert dispatch.static_cache_kernel("cpu") is triton
    assert dispatch.fused_combine("cpu", differential=True) is (triton and unbounded == "sdpa")
    assert dispatch.fused_combine("cpu", differential=False) is False


def test_autotuning_runs_only_when_asked_and_never_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(dispatch.AUTOTUNE_ENV, raising=False)
    assert not dispatch.autotune()  # a first request must not compile every candidate shape
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "1")
    assert dispatch.autotune()
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "0")
    assert not dispatch.autotune()
    monkeypatch.setenv(dispatch.AUTOTUNE_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dispatch.autotune()


def test_float32_dots_follow_the_environment_then_the_choice_then_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(dispatch.FP32_DOTS_ENV, raising=False)
    before = torch.get_float32_matmul_precision()
    try:
        for torch_precision, ours in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(torch_precision)
            assert dispatch.float32_dots() == ours
        torch.set_float32_matmul_precision("highest")  # torch's default: exact float32 tiles
        dispatch.set_float32_dots("tf32x3")  # what the neural database on CUDA chooses
        assert dispatch.float32_dots() == "tf32x3" and not dispatch.float32_dots_forced()
        monkeypatch.setenv(dispatch.FP32_DOTS_ENV, "ieee")  # the user's environment stands over the choice
        assert dispatch.float32_dots() == "ieee" and dispatch.float32_dots_forced()
        monkeypatch.setenv(dispatch.FP32_DOTS_ENV, "fp64")
        with pytest.raises(ValueError, match="CODA_GQA_L_FP32_DOTS must be one of ieee, tf32x3, tf32, got 'fp64'"):
            dispatch.float32_dots()
        with pytest.raises(ValueError, match="float32 dots must be one of"):
            dispatch.set_float32_dots("bf16")  # type: ignore[arg-type]
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter computes in float32 whatever is asked
        assert dispatch.float32_dots() == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
        dispatch.set_float32_dots(None)


class _Kernel:
    """Stands in for a compiled Triton kernel: counts its loads, which may fail."""

    def __init__(self, fails: bool = False) -> None:
        self.loads, self.fails = 0, fails

    def _init_handles(self) -> None:
        self.loads += 1
        if self.fails:
            raise RuntimeError("no such device")


def test_compile_ahead_loads_each_kernel_on_its_worker_thread() -> None:
    """The wrapped compile loads the kernel inside the device context; a failed load is left to the first launch;
    something without a load is returned as it is."""
    entered: list[str] = []

    @contextlib.contextmanager
    def on_device() -> Iterator[None]:
        entered.append("device")
        yield

    kernel = _Kernel()
    assert dispatch.compile_then_load(lambda: kernel, on_device)() is kernel
    assert kernel.loads == 1 and entered == ["device"]
    failing = _Kernel(fails=True)
    assert dispatch.compile_then_load(lambda: failing, on_device)() is failing and failing.loads == 1
    plain = object()
    assert dispatch.compile_then_load(lambda: plain, on_device)() is plain

    class Mode:  # the shape of triton.AsyncCompileMode.submit, as the JIT calls it
        def __init__(self, pool: object) -> None:
            self.submitted: list[tuple[object, object, tuple[object, ...]]] = []

        def submit(self, key: object, compile_fn: object, *callbacks: object) -> object:
            self.submitted.append((key, compile_fn, callbacks))
            return "future"

    mode = dispatch._loading_too(Mode)(None)
    assert mode.submit("key", lambda: kernel, "finalize", "cleanup") == "future"
    key, wrapped, callbacks = mode.submitted[0]
    assert key == "key" and callbacks == ("finalize", "cleanup")
    assert wrapped() is kernel and kernel.loads == 2  # the worker's compile now loads too


SWITCHES = {
    "key followers": (dispatch.KEY_FOLLOWERS_ENV, dispatch.key_followers, dispatch.routing_key_followers,
                      dispatch.DEFAULT_KEY_FOLLOWERS),
    "routing ahead": (dispatch.ROUTING_AHEAD_ENV, dispatch.routing_ahead, dispatch.prefill_routes_ahead,
                      dispatch.DEFAULT_ROUTING_AHEAD),
}  # fmt: skip


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_on_off_switches_come_from_the_block_then_the_environment(switch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env, block, value, default = SWITCHES[switch]
    monkeypatch.delenv(env, raising=False)
    assert value() is default
    monkeypatch.setenv(env, "1")
    assert value() is True
    with block(False):
        assert value() is False
    monkeypatch.setenv(env, "0")
    assert value() is False
    with block(True):
        assert value() is True
    monkeypatch.setenv(env, "yes")
    with pytest.raises(ValueError, match=f"{env} must be 1 or 0"):
        value()


def test_a_triton_older_than_the_kernels_need_falls_back_to_pytorch_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's CUDA wheels before 2.8 bring Triton 3.3 or older, without the dependent launches the kernels use: the
    PyTorch path runs, said once, and asking for Triton by name says why it cannot."""
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.3.1" if name == "triton" else real_version(name))
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    dispatch.triton_available.cache_clear()
    try:
        assert "Triton 3.3.1 is older than 3.4" in (dispatch.triton_problem() or "")
        with pytest.warns(RuntimeWarning, match="PyTorch reference path runs instead"):
            assert dispatch.backend("cuda") == "torch"
        monkeypatch.setenv(dispatch.BACKEND_ENV, "triton")
        with pytest.raises(RuntimeError, match="Triton 3.3.1 is older than 3.4"):
            dispatch.backend("cuda")
    finally:
        monkeypatch.undo()
        dispatch.triton_available.cache_clear()
    assert dispatch.triton_problem() is None  # the installed one (CI pins 3.9)
