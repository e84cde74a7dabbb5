"""Layer-level speed and memory suite (issue 5): bounded CoDA against GQA and the public package.

    PYTHONPATH=src python benchmarks/run_suite.py [--public-wheels .whl_bench] [--out benchmarks/results]
    PYTHONPATH=src python benchmarks/run_suite.py --quick --device cpu      # smoke run, seconds

Per layer, batch 1, bf16 on CUDA, at the 7B shape (D 4096, H 32, Hkv 8, Dh 128) and the 70B
shape (D 8192, H 64, Hkv 8, Dh 128), configurations tiny, medium, large and window-only (384
window slots, no banks: medium's storage). Sections (``--only``):

- ``prefill``: tokens/s at 2K/8K/32K of a bare SDPA GQA layer, ``BaselineGQA`` and the bounded
  layer's ``prefill_chunked``; peak memory;
- ``routing``: the share of bounded prefill time spent routing into the banks;
- ``decode``: tokens/s at contexts 2K/32K/128K: ``BaselineGQA`` with a static cache under a
  CUDA graph, a fixed-length flash reference, the growing cache, and the bounded layer
  (``CapturedDecoder`` when it exists); state bytes next to the full cache; peak memory;
- ``kernel``: fused differential attention TFLOP/s forward and forward+backward against SDPA on
  the same stacked problem, head sizes 128 and 64, 2K and 8K;
- ``train``: forward+backward of unbounded ``CoDAGQA`` against GQA at 2K;
- ``public``: the public package's wheels (1.2.0, 1.3.1), each in its own process.

Timing: device events, warm-up, median of repeats (``bench_common``). Ratios are printed
against the fastest baseline of the same run, with the issue's goals. The whole suite keeps to
``--deadline-s`` (sections share it; what does not fit is recorded as skipped). The JSON
(``--out``, rewritten after every section) holds the device, versions, date and command; the
tables printed last come from ``render_tables.py``, which also draws the plots.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_common import SHAPES, Deadline, Settings, skipped
from public_package import public_section
from render_tables import markdown_report, render
from suite_decode import decode_section, optional_attr
from suite_kernel import kernel_section
from suite_layers import device_ceilings, prefill_section, train_section
from suite_routing import routing_share
from suite_targets import add_floors, evaluate

from coda_gqa_l.kernels import BACKEND_ENV, backend

log = logging.getLogger("suite")

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("prefill", "routing", "decode", "kernel", "train", "public")
# shares of the time budget; unused time rolls on to the sections after
SECTION_WEIGHTS = {"prefill": 3.0, "routing": 0.5, "decode": 3.0, "kernel": 1.0, "train": 0.5, "public": 2.5}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


FULL = {
    "shapes": "7B,70B",
    "prefill_lengths": "2048,8192,32768",
    "decode_contexts": "2048,32768,131072",
    "kernel_lengths": "2048,8192",
    "kernel_head_dims": "128,64",
    "kernel_heads": "32,8",
    "train_length": 2048,
    "routing_length": 32768,
    "block_size": 4096,
    "decode_steps": 64,
    "max_repeats": 10,
    "min_repeats": 3,
    "measure_budget_s": 2.0,
    "deadline_s": 480.0,
}
QUICK = {
    "shapes": "quick",
    "prefill_lengths": "64,320",
    "decode_contexts": "64,320",
    "kernel_lengths": "64",
    "kernel_head_dims": "16",
    "kernel_heads": "4,2",
    "train_length": 64,
    "routing_length": 320,
    "block_size": 128,
    "decode_steps": 8,
    "max_repeats": 2,
    "min_repeats": 1,
    "measure_budget_s": 0.1,
    "deadline_s": 60.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny shapes and few repeats: a smoke run of every section")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", help="bfloat16 on CUDA, float32 on the CPU unless given")
    add("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    add("--shapes", help=f"comma-separated names of {','.join(SHAPES)} (default 7B,70B)")
    add("--configs", default="tiny,medium,large,window", help="bounded configurations (window = window-only 384)")
    add("--prefill-lengths", help="default 2048,8192,32768")
    add("--decode-contexts", help="default 2048,32768,131072")
    add("--kernel-lengths", help="default 2048,8192")
    add("--kernel-head-dims", help="default 128,64")
    add("--kernel-heads", help="H,Hkv of the stacked problem (default 32,8)")
    add("--train-length", type=int)
    add("--routing-length", type=int, help="default 32768")
    add("--block-size", type=int, help="prefill_chunked block size (default 4096)")
    add("--public-block-size", type=int, help="the public package's block size (default: --block-size)")
    add("--decode-steps", type=int, help="steps per timed sample, a multiple of every segment (default 64)")
    add("--max-repeats", type=int)
    add("--min-repeats", type=int)
    add("--measure-budget-s", type=float, help="stop repeating a measurement after this long (min repeats kept)")
    add("--deadline-s", type=float, help="wall-clock budget of the whole suite (default 480)")
    add("--target-shape", default="7B", help="the shape the issue's targets are read at")
    add("--target-config", default="medium", help="the configuration the issue's targets are read at")
    add("--public-wheels", default=str(REPO / ".whl_bench"), help="folder with coda_gqa_l-*.whl of the public package")
    add("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the JSON, tables and plots")
    add("--threads", type=int, help="CPU threads (quick on the CPU: 1; two threads on a busy machine stall for ms)")
    add("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    on_cpu = torch.device(args.device).type == "cpu"
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.threads = args.threads or (1 if args.quick and on_cpu else None)
    args.only = _names(args.only)
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    shapes, configs = _names(args.shapes), _names(args.configs)
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; choose from {','.join(SHAPES)}")
    # the targets are read at the shape and configuration, or the first measured ones
    args.target_shape = args.target_shape if args.target_shape in shapes else shapes[0]
    args.target_config = args.target_config if args.target_config in configs else configs[0]
    return args


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _kernels(device: str) -> str:
    """Which implementation the layers dispatch to here, and what the environment asked for."""
    asked = f"{BACKEND_ENV}={os.environ.get(BACKEND_ENV, 'auto')}"
    try:
        return f"{backend(device)} ({asked})"
    except (RuntimeError, ValueError) as exc:
        return f"{asked}: {exc}"


def environment(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """What the numbers were measured on, and with what."""
    cuda = settings.cuda
    fused, fused_why = optional_attr("coda_gqa_l.kernels.diff_attention", "differential_attention")
    decoder, decoder_why = optional_attr("coda_gqa_l.decode", "CapturedDecoder")
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name()
        if cuda
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "dtype": settings.dtype,
        "git_commit": _git_commit(),
        "kernels": _kernels(settings.device),
        "fused_differential_attention": "available" if fused else fused_why,
        "captured_decoder": "available" if decoder else decoder_why,
        "quick": args.quick,
    }


def _runners(args: argparse.Namespace, settings: Settings) -> dict[str, Callable[[Deadline], list[dict[str, Any]]]]:
    shapes = [SHAPES[name] for name in _names(args.shapes)]
    configs, lengths, contexts = _names(args.configs), _ints(args.prefill_lengths), _ints(args.decode_contexts)
    heads = tuple(_ints(args.kernel_heads))
    return {
        "prefill": lambda d: prefill_section(shapes, configs, lengths, settings, d),
        "routing": lambda d: [
            routing_share(SHAPES[args.target_shape], args.target_config, args.routing_length, settings, d)
        ],
        "decode": lambda d: decode_section(shapes, configs, contexts, settings, d),
        "kernel": lambda d: kernel_section(
            (heads[0], heads[1]), _ints(args.kernel_head_dims), _ints(args.kernel_lengths), settings, d
        ),
        "train": lambda d: train_section(shapes, args.train_length, settings, d),
        "public": lambda d: public_section(
            args.public_wheels,
            shapes,
            configs,
            lengths,
            contexts,
            settings,
            args.public_block_size or args.block_size,
            d,
        ),
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    settings = Settings(
        device=args.device,
        dtype=args.dtype,
        max_repeats=args.max_repeats,
        min_repeats=args.min_repeats,
        measure_budget_s=args.measure_budget_s,
        decode_steps=args.decode_steps,
        block_size=args.block_size,
        threads=args.threads,
    )
    settings.apply_threads()
    path = args.out / ("suite_quick.json" if args.quick else "suite.json")
    deadline = Deadline(args.deadline_s, {s: SECTION_WEIGHTS[s] for s in args.only})
    results: dict[str, Any] = {"meta": environment(args, settings), "settings": settings.to_dict(), "rows": []}
    results["ceilings"] = device_ceilings(settings) if settings.cuda else skipped("no roofline on the CPU")
    runners = _runners(args, settings)
    for section in (s for s in SECTIONS if s in args.only):
        budget = deadline.start_section(section)
        log.info("section %s: %.0f s of budget", section, budget)
        results["rows"] += runners[section](deadline)
        write_json(results, path)  # a run cut short keeps what it measured
    add_floors(results["rows"], results["ceilings"])
    results["targets"] = evaluate(
        results["rows"], args.target_shape, args.target_config, _ints(args.prefill_lengths), _ints(args.decode_contexts)
    )
    results["meta"]["elapsed_s"] = args.deadline_s - deadline.remaining_s()
    write_json(results, path)
    try:
        written = render(path, plots=not args.no_plots)
    except ImportError as exc:  # no matplotlib: the tables still matter more than the plots
        log.warning("plots skipped: %s", exc)
        written = render(path, plots=False)
    for target in results["targets"]:
        if target["name"].startswith("fair baseline") and target["status"] == "miss":
            log.warning("UNFAIR BASELINE: %s = %.3f (goal >= 0.9)", target["name"], target["value"])
    print(markdown_report(results, brief=True))
    print(f"wrote {path} and " + ", ".join(str(p) for p in written))
    return path


if __name__ == "__main__":
    main()
