"""The factorial's control arm: SmolLM2 with plain GQA attention and the same banks, trained in the
same stages as the shipped CoDA weights (their metadata records the history: a first run, 20 more
phase-2 updates, then 90 with the write-gate hinge), on the same data, tokens and learning rates.

Each stage is one ``coda-train --attention gqa`` run started from the previous stage's weights file,
all in this one process so the CUDA context and the compiled kernels are made once. A stage whose
weights file is complete is skipped and one with a checkpoint resumes, so the script can be run
again after an interruption (copy OUT back first).

    python benchmarks/train_gqa_arm.py --out runs/gqa-arm            # final weights: OUT/stage3/coda.safetensors
    python benchmarks/train_gqa_arm.py --out /tmp/smoke --smoke      # tiny random Llama, 1 update a phase

One deviation from the CoDA arm, to fit the device's time: the first run's 66 phase-2 updates of
4 x 2,048 tokens are 33 updates of 8 x 2,048 here (the same 541K tokens, warm-up 10 instead of 20);
phase 2's reference routing is paced by its serial segments, not by rows, so this halves its time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from coda_gqa_l.models.weights import read_coda_meta  # noqa: E402
from coda_gqa_l.training.cli import CHECKPOINT  # noqa: E402
from coda_gqa_l.training.cli import main as coda_train  # noqa: E402

WEIGHTS = "coda.safetensors"


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # the CoDA arm's stage it repeats
    args: tuple[str, ...]


STAGES = (
    Stage("stage1a", "first run, phase 1: 40 updates of 4 x 1,024 at lr 1e-3",
          ("--phase1-steps", "40", "--phase2-steps", "0", "--batch-size", "4", "--seq-len", "1024",
           "--lr", "1e-3", "--warmup", "20", "--gate-weight", "0")),
    Stage("stage1b", "first run, phase 2: 66 updates of 4 x 2,048 at lr 1e-3 (here 33 of 8 x 2,048)",
          ("--phase2-steps", "33", "--batch-size", "8", "--phase2-seq-len", "2048",
           "--lr", "1e-3", "--warmup", "10", "--gate-weight", "0")),
    Stage("stage2", "second run: 20 phase-2 updates of 32 x 1,024 at lr 5e-4",
          ("--phase2-steps", "20", "--batch-size", "16", "--accum", "2", "--phase2-seq-len", "1024",
           "--lr", "5e-4", "--warmup", "10", "--gate-weight", "0")),
    Stage("stage3", "third run: 90 phase-2 updates of 32 x 1,024, write-gate hinge, gate lr 5e-3",
          ("--phase2-steps", "90", "--batch-size", "16", "--accum", "2", "--phase2-seq-len", "1024",
           "--lr", "5e-4", "--gate-lr", "5e-3", "--warmup", "5", "--gate-weight", "1")),
)  # fmt: skip

# --smoke: the tiny random Llama on a small text, one update a phase, short rows
SMOKE_OVERRIDES = {"--phase1-steps": "1", "--seq-len": "128", "--phase2-seq-len": "512", "--batch-size": "2",
                   "--accum": "1"}  # fmt: skip
SMOKE_FIXED = ("--tiny-model", "--config", "tiny", "--num-sink", "2", "--needle-distance", "256")


def stage_args(stage: Stage, smoke: bool) -> list[str]:
    args = list(stage.args)
    if not smoke:
        return args
    for flag, value in SMOKE_OVERRIDES.items():
        if flag in args:
            args[args.index(flag) + 1] = value
    if "--phase2-steps" in args and args[args.index("--phase2-steps") + 1] != "0":
        args[args.index("--phase2-steps") + 1] = "1"
    return args + list(SMOKE_FIXED)


def is_complete(folder: Path) -> bool:
    weights = folder / WEIGHTS
    return weights.is_file() and bool(read_coda_meta(weights).get("training", {}).get("completed"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="one folder per stage is made here")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for all stages; then checkpoint")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, one update a phase (a check)")
    p.add_argument("--corpus", default="wikipedia", help="passed to coda-train (the smoke test gives a file)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    previous: Path | None = None
    record = []
    for stage in STAGES:
        folder = args.out / stage.name
        if is_complete(folder):
            print(f"train_gqa_arm: {stage.name} is complete; skipped", flush=True)
        else:
            argv_stage = ["--attention", "gqa", "--corpus", args.corpus, "--out", str(folder), "--save-every", "5",
                          *stage_args(stage, args.smoke)]  # fmt: skip
            if previous is not None:
                argv_stage += ["--init-weights", str(previous / WEIGHTS)]
            if (folder / CHECKPOINT).exists():
                argv_stage.append("--resume")
            if args.time_budget is not None:
                left = args.time_budget - (time.monotonic() - began)
                if left <= 0:
                    print(f"train_gqa_arm: time budget spent before {stage.name}; run again to go on", flush=True)
                    return 0
                argv_stage += ["--time-budget", f"{left:.0f}"]
            print(f"train_gqa_arm: {stage.name} ({stage.what}): coda-train {' '.join(argv_stage)}", flush=True)
            started = time.monotonic()
            if coda_train(argv_stage) != 0:
                return 1
            record.append({"stage": stage.name, "seconds": time.monotonic() - started, "args": argv_stage})
            if not is_complete(folder):
                print(f"train_gqa_arm: {stage.name} stopped at its time budget; run again to go on", flush=True)
                break
        previous = folder
    with (args.out / "stages.jsonl").open("a") as log:
        for row in record:
            log.write(json.dumps(row) + "\n")
    if previous is not None and previous.name == STAGES[-1].name:
        print(f"train_gqa_arm: the GQA arm's weights: {previous / WEIGHTS}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
