"""The CPU thread count the tools choose: the user's --threads, then $CODA_GQA_L_THREADS, then an
OMP_NUM_THREADS the user set, then the cores not already busy."""

from __future__ import annotations

import os

import pytest
import torch

from coda_gqa_l import cpu_threads
from coda_gqa_l.cpu_threads import THREADS_ENV, chosen_threads, default_threads, set_cpu_threads


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_order_of_choices(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(cpu_threads, "usable_cores", lambda: 8)
    clean_env.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert default_threads() == 5 and chosen_threads() == 5  # 8 cores, about 3 busy
    clean_env.setenv("OMP_NUM_THREADS", "2")
    assert chosen_threads() is None  # the user's OpenMP setting is kept
    clean_env.setenv(THREADS_ENV, "3")
    assert chosen_threads() == 3
    assert chosen_threads(6) == 6
    clean_env.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert default_threads() == 1  # never fewer than one


def test_more_threads_than_free_cores_are_warned_about(
    clean_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked for more threads than cores not already busy, the choice is kept and a warning says the cost."""
    clean_env.setattr(cpu_threads, "usable_cores", lambda: 2)
    clean_env.setattr(os, "getloadavg", lambda: (1.0, 0.0, 0.0))
    with caplog.at_level("WARNING", logger="coda_gqa_l.cpu_threads"):
        assert chosen_threads(1) == 1
        assert not caplog.records
        assert chosen_threads(2) == 2
    assert "2 CPU threads asked for, but only 1 of 2 cores are free" in caplog.text
    caplog.clear()
    clean_env.setenv(THREADS_ENV, "2")  # a parent's choice handed to a child process: no warning there
    with caplog.at_level("WARNING", logger="coda_gqa_l.cpu_threads"):
        assert chosen_threads() == 2
    assert not caplog.records


def test_bad_thread_counts_are_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        chosen_threads(0)
    clean_env.setenv(THREADS_ENV, "two")
    with pytest.raises(ValueError, match="CODA_GQA_L_THREADS"):
        chosen_threads()


def test_set_cpu_threads_sets_torch(clean_env: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_coda_db_refuses_a_bad_thread_count(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from coda_gqa_l.neuraldb.cli import main

    assert main(["--threads", "0", "list"]) == 2
    assert "at least 1 CPU thread" in capsys.readouterr().err
