"""The built wheel installs into a fresh environment and works from outside the repository."""

from __future__ import annotations

import site
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

import coda_gqa_l

REPO = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent(
    """
    import pathlib, sys
    import torch
    import coda_gqa_l
    from coda_gqa_l import BoundedCoDAAttention

    venv, expected_version = pathlib.Path(sys.argv[1]).resolve(), sys.argv[2]
    here = pathlib.Path(coda_gqa_l.__file__).resolve()
    assert here.is_relative_to(venv), f"imported from {here}, not from the venv {venv}"
    assert (here.parent / "py.typed").is_file(), "py.typed is not in the wheel"
    assert coda_gqa_l.__version__ == expected_version, coda_gqa_l.__version__

    torch.manual_seed(0)
    layer = BoundedCoDAAttention(32, 4, 2, window=32, num_landmarks_exact=8, num_landmarks_summary=8)
    state = layer.init_state(1)
    with torch.inference_mode():
        y, state = layer.prefill_chunked(torch.randn(1, 300, 32), state, block_size=64)
    assert y.shape == (1, 300, 32) and bool(torch.isfinite(y).all()), "outputs not finite"
    assert state.pos == 300
    print("ok", here)
    """
)


def _build_wheel(out: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0:
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(REPO)]
        built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(cmd)} failed:\n{built.stdout}\n{built.stderr}"
    wheels = sorted(out.glob("coda_gqa_l-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    return wheels[0]


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    assert wheel.name.startswith(f"coda_gqa_l-{coda_gqa_l.__version__}-")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    # The dependencies (torch, ...) come from the environment running the tests, which may itself be a
    # virtual environment: system_site_packages would show the base interpreter's instead. A .pth file
    # adds our site-packages after the new environment's own, so the wheel installed there wins; the .pth
    # files inside the added folder (our editable install among them) are not run.
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, f"installing the wheel failed:\n{done.stdout}\n{done.stderr}"

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ran = subprocess.run(
        [str(python), "-c", CHECK, str(env_dir), coda_gqa_l.__version__],
        cwd=outside,
        capture_output=True,
        text=True,
        env={"PATH": str(python.parent), "HOME": str(tmp_path)},
        timeout=120,
    )
    assert ran.returncode == 0, f"the installed package failed:\n{ran.stdout}\n{ran.stderr}"
    assert ran.stdout.startswith("ok ")
