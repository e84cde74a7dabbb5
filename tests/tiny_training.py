"""A two-update coda-train run on the tiny random Llama, shared by the training tests."""

from __future__ import annotations

import random
from pathlib import Path

TEXT = " ".join(random.Random(0).choice("alpha beta gamma delta river stone cloud".split()) for _ in range(4000))


def train_tiny(out: Path, *extra: str) -> int:
    """coda-train with 2 + 2 updates of short sequences on ``TEXT``; returns its exit code."""
    from coda_gqa_l.training.cli import main

    corpus = out.parent / "corpus.txt"
    corpus.write_text(TEXT)
    return main(["--tiny-model", "--corpus", str(corpus), "--config", "tiny", "--num-sink", "2",
                 "--phase1-steps", "2", "--phase2-steps", "2", "--seq-len", "128", "--phase2-seq-len", "512",
                 "--batch-size", "2", "--needle-distance", "256", "--out", str(out), *extra])  # fmt: skip
