"""The public-package section of the suite: ``coda-gqa-l`` 1.2.0 and 1.3.1, measured in the same run.

The public package imports as ``coda_gqa_l``, like ours, so each wheel is unzipped into a
temporary folder and measured by ``public_child.py`` in a subprocess whose ``PYTHONPATH`` holds
that folder and no entry that contains another ``coda_gqa_l`` (our ``src``). Its code is only
run, never copied.

A crash is a result: a child that dies is recorded with its exit code and the end of its
stderr, and a fresh child carries on with the configurations it had not reached (an
asynchronous CUDA error poisons the whole process, so a new one is needed).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from bench_common import Deadline, Settings, Shape, skipped

log = logging.getLogger("suite")

CHILD = Path(__file__).with_name("public_child.py")
STDERR_TAIL = 2000


def find_wheels(folder: str) -> list[Path]:
    path = Path(folder)
    return sorted(path.glob("coda_gqa_l-*.whl")) if path.is_dir() else []


def child_environment(package_dir: Path) -> dict[str, str]:
    """Our environment with ``PYTHONPATH`` = the unzipped wheel, then the entries that hold no
    other ``coda_gqa_l`` (carried wheels, for instance)."""
    env = dict(os.environ)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "coda_gqa_l").exists()]
    env["PYTHONPATH"] = os.pathsep.join([str(package_dir), *kept])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _parse(stdout: str) -> tuple[list[dict[str, Any]], set[str], bool]:
    rows, done, broken = [], set(), False
    for line in stdout.splitlines():
        if line.startswith("@@ROW "):
            rows.append(json.loads(line[len("@@ROW ") :]))
        elif line.startswith("@@DONE "):
            done.add(line[len("@@DONE ") :].strip())
        elif line.startswith("@@BROKEN"):
            broken = True
    return rows, done, broken


class PublicRun:
    """Every configuration of one wheel at one shape, across as many child processes as it takes."""

    def __init__(self, version: str, package_dir: Path, shape: Shape, spec: dict[str, Any]):
        self.version, self.package_dir, self.shape, self.spec = version, package_dir, shape, spec

    def _event_row(self, config: str, **fields: Any) -> dict[str, Any]:
        method = f"public-{self.version}-{config}"
        return {
            "section": "public",
            "shape": self.shape.name,
            "method": method,
            "package": f"coda-gqa-l=={self.version}",
        } | fields

    def run(self, configs: list[str], budget_s: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        pending = list(configs)
        end = time.perf_counter() + budget_s
        while pending:
            left = end - time.perf_counter()
            if left <= 1:
                rows += [
                    self._event_row(c, **skipped("the suite's time budget for this section ran out")) for c in pending
                ]
                break
            spec = self.spec | {"configs": pending, "deadline_unix": time.time() + left}
            command = [sys.executable, str(CHILD), json.dumps(spec)]
            try:
                done = subprocess.run(
                    command, env=child_environment(self.package_dir), capture_output=True, text=True, timeout=left + 60
                )
            except subprocess.TimeoutExpired as exc:
                stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
                found, finished, _ = _parse(stdout)
                rows += found
                rows += [self._event_row(c, status="error", error="timed out") for c in pending if c not in finished]
                break
            found, finished, broken = _parse(done.stdout)
            rows += found
            remaining = [c for c in pending if c not in finished]
            log.info(
                "public %s %s: exit %s, finished %s", self.version, self.shape.name, done.returncode, sorted(finished)
            )
            if remaining and (done.returncode != 0 and not broken):
                # it died inside the first configuration it had not finished: record that crash
                error = f"the process exited with code {done.returncode}"
                rows.append(
                    self._event_row(remaining[0], status="error", error=error, stderr=done.stderr[-STDERR_TAIL:])
                )
                remaining = remaining[1:]
            elif remaining and done.returncode == 0:
                rows += [self._event_row(c, status="error", error="the child stopped early") for c in remaining]
                remaining = []
            pending = remaining
        return rows


def public_section(
    wheels_folder: str,
    shapes: list[Shape],
    configs: list[str],
    lengths: list[int],
    contexts: list[int],
    settings: Settings,
    block_size: int,
    deadline: Deadline,
) -> list[dict[str, Any]]:
    wheels = find_wheels(wheels_folder)
    if not wheels:
        return [{"section": "public"} | skipped(f"no coda_gqa_l-*.whl in {wheels_folder!r} (see --public-wheels)")]
    rows: list[dict[str, Any]] = []
    runs_left = len(wheels) * len(shapes)
    with tempfile.TemporaryDirectory(prefix="public_coda_") as scratch:
        for wheel in wheels:
            version = wheel.name.split("-")[1]
            package_dir = Path(scratch) / version
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(package_dir)
            for shape in shapes:
                spec = {
                    "package_dir": str(package_dir),
                    "settings": settings.to_dict(),
                    "shape": shape.__dict__,
                    "lengths": lengths,
                    "contexts": contexts,
                    "block_size": block_size,
                }
                # each (wheel, shape) gets an equal share of what is left, so 1.2.0 cannot starve 1.3.1
                budget = deadline.section_left_s() / runs_left
                rows += PublicRun(version, package_dir, shape, spec).run(configs, budget)
                runs_left -= 1
    return rows
