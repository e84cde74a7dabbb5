"""Average two CoDA weights files tensor by tensor (a weight-space mean of two runs from the same starting file).

    PYTHONPATH=src python scripts/average_weights.py FIRST SECOND OUT --share-first 0.3

OUT holds share * FIRST + (1 - share) * SECOND for every tensor, the files' shared configuration, and both training
histories with their shares (``read_coda_meta(OUT)["training"]["averaged_from"]``). The shipped weights since 0.3.0
are such a mean (benchmarks/results/facts.md, "Longer rows and weight averages").
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", type=Path)
    p.add_argument("second", type=Path)
    p.add_argument("target", type=Path)
    p.add_argument("--share-first", type=float, default=0.5, help="FIRST's weight in the mean, 0 to 1 (default 0.5)")
    args = p.parse_args(argv)
    from coda_gqa_l.models.weights import average_weights_files

    average_weights_files(args.first, args.second, args.target, args.share_first)
    print(f"{args.target}: {args.share_first:g} x {args.first.name} + {1 - args.share_first:g} x {args.second.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
