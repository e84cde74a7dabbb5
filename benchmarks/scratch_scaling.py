"""Data-parallel scaling of coda-scratch (issue 8): one process against N under torchrun, same global
batch, same seed, same tokens. The loss curves must match (they see the same batches; only the
order of float sums differs) and tokens/s should grow about N-fold.

Prints a table and writes OUT/scratch_scaling.json, .md and .png (loss per update, both runs).
On a GPU machine each process takes one GPU (NCCL); on the CPU, gloo (what CI tests).

    python benchmarks/scratch_scaling.py --processes 2 --out $OUT -- --attention coda --token-budget 20000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    p.add_argument("--port", type=int, default=29531)
    p.add_argument("--out", type=Path, default=Path("runs/scratch-scaling"))
    args, rest = p.parse_known_args(argv)
    return args, [a for a in rest if a != "--"]


def launch(processes: int, scratch_args: list[str], out: Path, port: int) -> tuple[list[dict[str, Any]], dict]:
    """Run coda-scratch in ``processes`` processes; its log records and summary."""
    module = ["-m", "coda_gqa_l.training.scratch"]
    if processes == 1:
        command = [sys.executable, *module]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(port), *module]  # fmt: skip
    done = subprocess.run([*command, *scratch_args, "--out", str(out)], text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{done.stderr[-4000:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return log, json.loads((out / "summary.json").read_text())


def compare(one: list[dict[str, Any]], many: list[dict[str, Any]]) -> dict[str, float]:
    if len(one) != len(many):
        raise RuntimeError(f"the runs made {len(one)} and {len(many)} updates: give a token or step budget")
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, many, strict=True)]
    relative = [d / abs(a["loss"]) for d, a in zip(diffs, one, strict=True)]
    return {"updates": len(one), "max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": statistics.mean(diffs),
            "max_rel_loss_diff": max(relative)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, scratch_args = parse_args(argv)
    if args.fsdp:
        scratch_args = [*scratch_args, "--fsdp"]
    args.out.mkdir(parents=True, exist_ok=True)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    one_log, one = launch(1, scratch_args, args.out / "one", args.port)
    many_log, many = launch(args.processes, scratch_args, args.out / f"x{args.processes}", args.port)
    result = {
        "command": "python benchmarks/scratch_scaling.py " + " ".join(sys.argv[1:]),
        "omp_num_threads": env_threads,
        "one": one,
        "many": many,
        "curves": compare(one_log, many_log),
        "tokens_per_s_ratio": many["tokens_per_s"] / one["tokens_per_s"],
        "losses": {"one": [r["loss"] for r in one_log], "many": [r["loss"] for r in many_log]},
    }
    (args.out / "scratch_scaling.json").write_text(json.dumps(result, indent=1))
    report = markdown(result, args.processes)
    (args.out / "scratch_scaling.md").write_text(report)
    _plot(result, args.processes, args.out / "scratch_scaling.png")
    print(report)
    return 0


def markdown(result: dict[str, Any], processes: int) -> str:
    one, many, curves = result["one"], result["many"], result["curves"]
    final = {k: (v["final"] or {}).get("val_bpb", float("nan")) for k, v in (("one", one), ("many", many))}
    return "\n".join([
        f"Command: `{result['command']}`  ",
        f"Device: {many['device']}; {many['attention']}, global batch {many['global_batch']}, {many['parallel']}.",
        "",
        "| processes | updates | tokens | median step | tokens/s | final val bpb |",
        "|---|---|---|---|---|---|",
        f"| 1 | {one['steps']} | {one['tokens']:,} | {one['median_step_s'] * 1000:.1f} ms | {one['tokens_per_s']:,.0f} "
        f"| {final['one']:.4f} |",
        f"| {processes} | {many['steps']} | {many['tokens']:,} | {many['median_step_s'] * 1000:.1f} ms "
        f"| {many['tokens_per_s']:,.0f} | {final['many']:.4f} |",
        "",
        f"Tokens/s ratio: {result['tokens_per_s_ratio']:.3f}x. Loss curves over {curves['updates']} updates: "
        f"largest difference {curves['max_abs_loss_diff']:.2e} ({curves['max_rel_loss_diff']:.2e} relative), "
        f"mean {curves['mean_abs_loss_diff']:.2e}.",
    ]) + "\n"  # fmt: skip


def _plot(result: dict[str, Any], processes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    axis.plot(result["losses"]["one"], label="1 process", linewidth=2.5, alpha=0.6)
    axis.plot(result["losses"]["many"], label=f"{processes} processes", linestyle="--")
    axis.set(xlabel="update", ylabel="training loss (nats/token)", title="Same global batch, 1 vs N processes")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
