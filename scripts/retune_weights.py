"""Copy a CoDA weights file with other bank-routing thresholds (the tensors are unchanged).

    PYTHONPATH=src python scripts/retune_weights.py IN OUT --routing novelty=0.9 match=0.97 max_inserts=16 \\
        --reason "chosen on dev documents: benchmarks/results/retrieval.md, 'Bank-routing thresholds'"

Measure first (``coda-eval --routing ...`` reads a file with other thresholds without rewriting
it); this makes the measured values the file's own, so everything that loads it (the neural
database's default included) routes that way. OUT may be IN.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--routing", nargs="+", required=True, metavar="NAME=VALUE")
    p.add_argument("--reason", required=True, help="why, recorded in the file's training metadata")
    args = p.parse_args(argv)
    from coda_gqa_l.config import parse_routing
    from coda_gqa_l.models.weights import read_coda_meta, retune_weights_file

    retune_weights_file(args.source, args.target, parse_routing(args.routing), args.reason)
    print(f"{args.target}: bounded config now {read_coda_meta(args.target)['convert']['bounded']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
