"""``coda-eval``: perplexity through the state and passkey retrieval beyond the window (docs/evaluation.md).

Methods, each the same base model (the packaged SmolLM2 unless ``--model``):

- ``original``: the unconverted model with a full cache;
- ``window``: bounded plain GQA, recent window only (same slot count as the bounded config);
- ``streaming``: StreamingLLM, 4 sinks + window, positions re-assigned inside the cache
  (our relative position mode places the sinks just before the window);
- ``coda-unbounded`` / ``coda-bounded``: the CoDA weights file (``--weights``) converted
  unbounded (full cache) or bounded; without ``--weights`` the cold swap (untrained);
- ``gqa-unbounded`` / ``gqa-bounded``: the factorial's control, plain attention trained the same
  way (``coda-train --attention gqa``, ``--gqa-weights``), with a full cache or the same banks.

Perplexity scores the same tokens at every length (the held-out Wikipedia text and the King
James Bible, one long document, cut into windows of that length, each read as a stream through
the state, see ``perplexity.perplexity_rows``); retrieval puts evaluation-phrased keys into essays
at least two windows before the question and scores greedy output (teacher-forced, see
``passkey_rows``), with 95% Wilson intervals; fact recall is ``fact_recall``. Writes
``OUT/eval.json``, ``OUT/eval.md``, ``OUT/perplexity.png`` and ``OUT/passkey.png``.

    coda-eval --weights runs/smollm2/coda.safetensors --out runs/eval

This module is the command line only: it fills an ``EvalConfig`` (evaluation/eval_config.py) and
runs ``evaluation.run.evaluate``; the methods are built by ``evaluation.methods.build_method``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_help import HelpFormatter, first_paragraph
from ..data.facts import KINDS
from .eval_config import METHODS, PERPLEXITY_TEXTS, EvalConfig
from .run import EvaluationSetupError, evaluate

DEFAULTS = EvalConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coda-eval", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULTS.model, help="'smollm2' (packaged) or a Hugging Face model folder")
    p.add_argument(
        "--weights",
        type=Path,
        default=DEFAULTS.weights,
        help="CoDA weights file, coda-train's output (default: none, a cold swap of the original)",
    )
    p.add_argument("--config", default=DEFAULTS.config, help="bounded preset of the cold swap and the slot count")
    p.add_argument("--num-sink", type=int, default=DEFAULTS.num_sink, help="sinks taken out of the exact bank")
    gqa_help = (
        "weights of the factorial's plain-GQA arm (coda-train --attention gqa) for the gqa-* methods "
        "(default: none, a cold swap)"
    )
    p.add_argument("--gqa-weights", type=Path, default=DEFAULTS.gqa_weights, help=gqa_help)
    p.add_argument("--methods", nargs="+", default=list(DEFAULTS.methods), choices=METHODS, help="what to measure")
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULTS.lengths), help="perplexity lengths")
    p.add_argument("--texts", nargs="+", default=list(DEFAULTS.texts), choices=PERPLEXITY_TEXTS,
                   help="perplexity texts: held-out Wikipedia, and the KJV Bible as one long document")  # fmt: skip
    p.add_argument(
        "--passkey-lengths",
        nargs="+",
        type=int,
        default=list(DEFAULTS.passkey_lengths),
        help="pass-key document lengths",
    )
    p.add_argument(
        "--depths",
        nargs="+",
        type=float,
        default=list(DEFAULTS.depths),
        help="where the key sits (share of the document)",
    )
    p.add_argument("--trials", type=int, default=DEFAULTS.trials, help="passkey trials per cell (0: perplexity only)")
    p.add_argument(
        "--keys", nargs="+", type=int, default=list(DEFAULTS.keys), help="needles per document (multi-key: 3)"
    )
    fact_help = "fact-recall trials per kind and length (names, places, dates, ...; 0: none, the default)"
    p.add_argument("--fact-trials", type=int, default=DEFAULTS.fact_trials, help=fact_help)
    p.add_argument(
        "--fact-lengths", nargs="+", type=int, default=list(DEFAULTS.fact_lengths), help="fact document lengths"
    )
    p.add_argument(
        "--fact-kinds", nargs="+", default=list(DEFAULTS.fact_kinds), choices=KINDS, help="fact kinds (default all)"
    )
    multi_help = "also documents holding this many facts, all asked (0: none; the issue's target uses 5)"
    p.add_argument("--fact-multi", type=int, default=DEFAULTS.fact_multi, help=multi_help)
    control_help = "no-fact control: the same questions on documents without the fact (what priors guess)"
    p.add_argument("--fact-control", action="store_true", help=control_help)
    p.add_argument("--chunk", type=int, default=DEFAULTS.chunk, help="tokens per forward when reading a stream")
    p.add_argument("--batch", type=int, default=DEFAULTS.batch, help="passkey documents per forward")
    p.add_argument("--dtype", default=DEFAULTS.dtype, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--device", default=DEFAULTS.device, help="torch device (default: cuda when there is one, else cpu)")
    threads_help = "CPU threads when the device is the CPU (default $CODA_GQA_L_THREADS, else the cores not busy)"
    p.add_argument("--threads", type=int, default=DEFAULTS.threads, help=threads_help)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of the documents, keys and facts")
    routing_help = "bank-routing thresholds for the coda-/gqa-bounded methods instead of the file's (e.g. novelty=0.85)"
    p.add_argument("--routing", nargs="+", default=list(DEFAULTS.routing), metavar="NAME=VALUE", help=routing_help)
    p.add_argument(
        "--time-budget",
        type=float,
        default=DEFAULTS.time_budget,
        help="seconds; cells not reached are marked skipped (default: none, no limit)",
    )
    p.add_argument("--out", type=Path, default=DEFAULTS.out, help="folder for eval.json, eval.md and the plots")
    p.add_argument("--tiny-model", action="store_true", help="a small random Llama and byte text (tests)")
    return p


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """The command line as an ``EvalConfig`` (``evaluate`` checks it before loading any model)."""
    return EvalConfig.from_command_line(build_parser(), argv, check=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        _, written = evaluate(parse_args(argv), command="coda-eval " + " ".join(argv))
    except EvaluationSetupError as exc:
        raise SystemExit(str(exc)) from None
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
