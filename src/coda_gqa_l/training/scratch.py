"""``coda-scratch`` (also ``coda-train --from-scratch``): train a small Llama from random weights
with plain GQA, unbounded CoDA or bounded CoDA attention for a fixed budget (docs/training.md).

This module is the command line only: it fills a ``ScratchConfig`` (training/scratch_config.py)
and runs ``scratch_trainer.train``; the model is ``scratch_model.build_model``.

Every variant starts from the same initial weights (the base is drawn before conversion, which
adds its own parameters from a separate generator) and sees the same batches in the same order
(one seeded sampler), so runs differ in attention alone. The budget is wall-clock seconds of
training (``--time-budget``, evaluation excluded), tokens (``--token-budget``), or both (whichever
ends first); the learning rate warms up, then follows a cosine over the budget's progress.
Validation is bits per byte on the held-out Wikipedia text. Under ``torchrun`` the run is data
parallel (DDP, or ``--fsdp``); rank 0 writes ``OUT/log.jsonl``, ``OUT/summary.json`` and the
checkpoint.

    coda-scratch --attention coda --time-budget 600 --out runs/scratch-coda
    torchrun --nproc_per_node 2 -m coda_gqa_l.training.scratch --attention gqa --out runs/gqa-2gpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_help import HelpFormatter, first_paragraph
from ..data.token_corpus import TOKENIZERS
from .scratch_config import ATTENTIONS, ScratchConfig
from .scratch_trainer import train

DEFAULTS = ScratchConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coda-scratch", description=first_paragraph(__doc__), formatter_class=HelpFormatter
    )
    attention_help = "gqa: plain attention; coda: differential; coda-bounded: differential with the fixed-size state"
    p.add_argument("--attention", default=DEFAULTS.attention, choices=ATTENTIONS, help=attention_help)
    p.add_argument("--depth", type=int, default=DEFAULTS.depth, help="decoder layers")
    p.add_argument("--width", type=int, default=DEFAULTS.width, help="hidden size")
    p.add_argument("--heads", type=int, default=DEFAULTS.heads, help="query heads")
    p.add_argument("--kv-heads", type=int, default=DEFAULTS.kv_heads, help="key/value heads")
    p.add_argument("--ffn", type=int, default=DEFAULTS.ffn, help="SwiGLU inner size")
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="training sequence length")
    p.add_argument("--config", default=DEFAULTS.config, help="bounded preset of coda-bounded")
    p.add_argument("--num-sink", type=int, default=DEFAULTS.num_sink, help="sinks taken out of the exact bank")
    p.add_argument(
        "--lambda-init", type=float, default=DEFAULTS.lambda_init, help="CoDA's lambda at the start (from scratch)"
    )
    p.add_argument(
        "--tokenizer", default=DEFAULTS.tokenizer, choices=TOKENIZERS, help="SmolLM2's (packaged) or UTF-8 bytes"
    )
    p.add_argument(
        "--global-batch", type=int, default=DEFAULTS.global_batch, help="sequences per update, over all processes"
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward per process (default: the whole per-process batch)",
    )
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    p.add_argument(
        "--min-lr-ratio", type=float, default=DEFAULTS.min_lr_ratio, help="cosine decay floor, as a share of --lr"
    )
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help="updates of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training, evaluation excluded (one of the three budgets; default: none)",
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="training tokens over all processes (one of the three budgets; default: none)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="updates (one of the three budgets; default: none)")
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every, help="updates between validations")
    p.add_argument("--val-tokens", type=int, default=DEFAULTS.val_tokens, help="held-out tokens per validation")
    p.add_argument(
        "--retrieval-fraction",
        type=float,
        default=0.0,
        help="training rows that are passkey documents (key >= 2 bounded windows before the question)",
    )
    p.add_argument(
        "--passkey-trials",
        type=int,
        default=DEFAULTS.passkey_trials,
        help="passkey test after training: trials per cell",
    )
    p.add_argument(
        "--passkey-lengths", nargs="+", type=int, default=None, help="pass-key document lengths (default: --seq-len)"
    )
    p.add_argument(
        "--passkey-depths", nargs="+", type=float, default=list(DEFAULTS.passkey_depths), help="where the key sits"
    )
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state (FSDP2)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the weights and the data order")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--out", type=Path, default=DEFAULTS.out, help="folder for the log and summary")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where corpora and token caches live (default: $CODA_GQA_L_CACHE, else the user cache folder)",
    )
    return p


def parse_args(argv: list[str] | None = None, check: bool = True) -> ScratchConfig:
    """The command line as a ``ScratchConfig``; a setting that cannot train exits with its reason
    (``check=False``: options a benchmark completes, e.g. with its own budget, before training)."""
    return ScratchConfig.from_command_line(build_parser(), argv, check=check)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    summary = train(parse_args(argv), command="coda-scratch " + " ".join(argv))
    if summary is not None:  # rank 0
        final = summary["final"] or {}
        print(
            f"coda-scratch: {summary['attention']} x{summary['processes']}: {summary['steps']} updates, "
            f"{summary['tokens']:,} tokens in {summary['trained_s']:.1f} s ({summary['tokens_per_s']:,.0f} tok/s, "
            f"median step {summary['median_step_s'] * 1000:.1f} ms); val bpb {final.get('val_bpb', float('nan')):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
