"""``coda-train``: two-phase training of a converted model (docs/training.md).

Phase 1 trains unbounded differential attention (full cache); phase 2 switches every layer to
the bounded state (``to_bounded``) and trains through the bank writes, on text mixed with
retrieval documents whose key sits at least two windows before its question; a hinge loss on
the write gate teaches it to keep those keys and refuse other tokens (``--gate-weight``,
training/gate_supervision.py). Each phase's
steps count optimizer updates. A checkpoint (trained parameters + AdamW state) is written every
``--save-every`` steps and when ``--time-budget`` runs out; ``--resume`` continues from it. The
end result is a CoDA weights file (``--weights``) that ``apply_coda_weights`` loads on the base.

    coda-train --model smollm2 --out runs/smollm2 --phase1-steps 100 --phase2-steps 300

This module is the command line only: it fills a ``TrainConfig`` (training/train_config.py) and
runs ``trainer.train``. ``coda-train --from-scratch ...`` trains a small model from random weights
instead (``coda-scratch``). Under ``torchrun`` it is data parallel (DDP): each process draws its
own batches, rank 0 logs and checkpoints (``torchrun --nproc_per_node 2 -m coda_gqa_l.training.cli``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_help import HelpFormatter, first_paragraph
from ..data.facts import VALUE_FIRST_KEEP
from .gate_supervision import REFUSE_MODES
from .scratch import main as scratch_main
from .train_config import ATTENTIONS, TRAINABLE, TrainConfig
from .trainer import CHECKPOINT, TrainingSetupError, train

__all__ = ["CHECKPOINT", "build_parser", "main", "parse_args"]

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coda-train", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULTS.model, help="'smollm2' (packaged) or a Hugging Face model folder")
    p.add_argument(
        "--corpus", default=DEFAULTS.corpus, help="'wikipedia' (packaged train split) or a .txt file / folder"
    )
    attention_help = "coda: differential attention; gqa: plain attention, same banks (the factorial's control)"
    p.add_argument("--attention", default=DEFAULTS.attention, choices=list(ATTENTIONS), help=attention_help)
    p.add_argument("--config", default=DEFAULTS.config, help="bounded preset for phase 2 (tiny/medium/large)")
    p.add_argument("--num-sink", type=int, default=DEFAULTS.num_sink, help="sinks taken out of the exact bank")
    routing_help = "bank-routing thresholds instead of the preset's (e.g. novelty=0.9 match=0.97 max_inserts=16)"
    p.add_argument("--routing", nargs="+", default=list(DEFAULTS.routing), metavar="NAME=VALUE", help=routing_help)
    # "all" would train the base weights, which a CoDA weights file does not hold: they would be lost at the end
    trainable_help = "which parameters train: the CoDA ones, or those and LoRA (the weights file holds both)"
    p.add_argument("--trainable", default=DEFAULTS.trainable, choices=list(TRAINABLE), help=trainable_help)
    p.add_argument(
        "--lora-rank", type=int, default=DEFAULTS.lora_rank, help="rank of the LoRA on the attention projections"
    )
    p.add_argument(
        "--lora-alpha", type=float, default=DEFAULTS.lora_alpha, help="LoRA scale numerator (scale = alpha / rank)"
    )
    p.add_argument(
        "--phase1-steps", type=int, default=DEFAULTS.phase1_steps, help="updates of phase 1 (unbounded CoDA)"
    )
    p.add_argument(
        "--phase2-steps",
        type=int,
        default=DEFAULTS.phase2_steps,
        help="updates of phase 2 (bounded, through the banks)",
    )
    p.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="phase-1 sequence length")
    p.add_argument("--phase2-seq-len", type=int, default=DEFAULTS.phase2_seq_len, help="phase-2 sequence length")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="rows per forward")
    p.add_argument("--accum", type=int, default=DEFAULTS.accum, help="gradient accumulation steps per update")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=DEFAULTS.warmup, help="updates of linear warm-up, in each phase")
    p.add_argument(
        "--retrieval-fraction",
        type=float,
        default=DEFAULTS.retrieval_fraction,
        help="phase-2 rows that are pass-key documents (default 0.5)",
    )
    fact_help = "phase-2 rows that are fact documents: names, places, dates, ... asked at the end (default 0)"
    p.add_argument("--fact-fraction", type=float, default=DEFAULTS.fact_fraction, help=fact_help)
    counts_help = "facts per fact row, drawn uniformly from this list; up to 5 of them asked (default 1 1 2 3 4 6)"
    p.add_argument(
        "--fact-counts", type=int, nargs="+", default=list(DEFAULTS.fact_counts), metavar="N", help=counts_help
    )
    value_first_help = (
        "phase 2: the chance a fact is stated value first ('A brass astrolabe hangs above ...'), where its kind has "
        "such patterns (default: none, every pattern of the kind alike)"
    )
    p.add_argument("--value-first-share", type=float, default=DEFAULTS.value_first_share, help=value_first_help)
    value_first_keep_help = (
        "phase 2: the write gate's keep targets in a value-first statement: 'value' its value's tokens, 'after' the "
        "statement's tokens after the value, which have read it (default value)"
    )
    p.add_argument(
        "--value-first-keep", choices=VALUE_FIRST_KEEP, default=DEFAULTS.value_first_keep, help=value_first_keep_help
    )
    recurring_help = "phase 2: in plain rows, capitalised words and numbers that recur 2 windows later are keep targets"
    p.add_argument("--recurring-keep", action="store_true", help=recurring_help)
    p.add_argument(
        "--needle-distance",
        type=int,
        default=DEFAULTS.needle_distance,
        help="tokens from key to question (default 2 windows)",
    )
    p.add_argument(
        "--answer-weight", type=float, default=DEFAULTS.answer_weight, help="weight of the loss on answer tokens"
    )
    gate_help = "phase 2: weight of the write-gate hinge loss (keys kept, other tokens refused; 0 turns it off)"
    p.add_argument("--gate-weight", type=float, default=DEFAULTS.gate_weight, help=gate_help)
    p.add_argument(
        "--gate-keep", type=float, default=DEFAULTS.gate_keep, help="gate a key token should reach (> tau_exact)"
    )
    p.add_argument(
        "--gate-drop",
        type=float,
        default=DEFAULTS.gate_drop,
        help="gate every other token should fall to (< tau_exact)",
    )
    refuse_help = (
        "phase 2: the hinge's refusal side averaged over all other tokens ('tokens') or over those still above "
        "--gate-drop ('violations': each false write weighs as much as a missed key; for value-first facts)"
    )
    p.add_argument("--gate-refuse", default=DEFAULTS.gate_refuse, choices=list(REFUSE_MODES), help=refuse_help)
    p.add_argument(
        "--gate-lr", type=float, default=DEFAULTS.gate_lr, help="learning rate of the write gates (default --lr)"
    )
    distill_help = (
        "phase 2: weight of a KL loss to the original model's full-cache predictions on every token that is not an "
        "answer; keeps general text (the Bible) close to the original while the facts train (default 0: off)"
    )
    p.add_argument("--distill-weight", type=float, default=DEFAULTS.distill_weight, help=distill_help)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the data order and the new weights")
    p.add_argument("--dtype", default=DEFAULTS.dtype, choices=["bfloat16", "float32"], help="autocast dtype on CUDA")
    p.add_argument("--device", default=DEFAULTS.device, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--out", type=Path, default=DEFAULTS.out, help="folder for the log, checkpoint and weights")
    p.add_argument(
        "--weights", type=Path, default=DEFAULTS.weights, help="final CoDA weights file (default OUT/coda.safetensors)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    init_help = (
        "start from a CoDA weights file (e.g. the shipped one); bounded weights start in phase 2 (default: none)"
    )
    p.add_argument("--init-weights", type=Path, default=DEFAULTS.init_weights, help=init_help)
    p.add_argument("--save-every", type=int, default=DEFAULTS.save_every, help="updates between checkpoints")
    p.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULTS.time_budget,
        help="seconds; then checkpoint and stop (default: none, no limit)",
    )
    p.add_argument("--tiny-model", action="store_true", help="a small random Llama and byte text (tests, smoke runs)")
    scratch_help = "train a small Llama from random weights instead; its options: coda-scratch --help"
    p.add_argument("--from-scratch", action="store_true", help=scratch_help)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a ``TrainConfig``; a setting that cannot train exits with its reason."""
    return TrainConfig.from_command_line(build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--from-scratch" in argv:  # the from-scratch mode has its own options (coda-scratch --help)
        return scratch_main([a for a in argv if a != "--from-scratch"])
    try:
        return train(parse_args(argv))
    except TrainingSetupError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    raise SystemExit(main())
