"""``EvalConfig``: every setting of a ``coda-eval`` run (methods, perplexity lengths and texts,
pass-key and fact-recall cells, device, budget), as one dataclass.

The command line fills it (``evaluation/cli.py``); benchmarks and tests build it directly, by name
or from a preset, and pass it to ``evaluation.run.evaluate``. Field names are the command line's
option names with ``_`` for ``-``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data.facts import KINDS
from ..run_settings import RunSettings
from .perplexity import check_lengths

METHODS = ("original", "window", "streaming", "coda-unbounded", "coda-bounded", "gqa-unbounded", "gqa-bounded")
DEFAULT_METHODS = METHODS[:5]
PERPLEXITY_TEXTS = ("wikipedia", "bible")


@dataclass
class EvalConfig(RunSettings):
    """A coda-eval run (docs/evaluation.md). The defaults are the command line's."""

    model: str = "smollm2"
    weights: Path | None = None
    config: str = "medium"  # the bounded preset of the cold swap, and the baselines' slot count
    num_sink: int = 4
    gqa_weights: Path | None = None
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 16384])
    texts: list[str] = field(default_factory=lambda: ["wikipedia", "bible"])
    passkey_lengths: list[int] = field(default_factory=lambda: [4096, 16384])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5])
    trials: int = 50
    keys: list[int] = field(default_factory=lambda: [1])
    fact_trials: int = 0
    fact_lengths: list[int] = field(default_factory=lambda: [4096, 16384])
    fact_kinds: list[str] = field(default_factory=lambda: list(KINDS))
    fact_multi: int = 0
    fact_control: bool = False
    chunk: int = 1024
    batch: int = 10
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    seed: int = 1234
    routing: list[str] = field(default_factory=list)  # NAME=VALUE bank-routing thresholds
    time_budget: float | None = None
    out: Path = Path("runs/coda-eval")
    tiny_model: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot run."""
        if not self.methods:
            raise ValueError(f"give at least one method of {list(METHODS)}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        unknown = sorted(set(self.texts) - set(PERPLEXITY_TEXTS))
        if unknown:
            raise ValueError(f"unknown perplexity texts {unknown}; choose from {list(PERPLEXITY_TEXTS)}")
        check_lengths(self.lengths)


EvalConfig.PRESETS = {
    # the command line's defaults: the five methods, perplexity 2K-16K, pass keys at 4K and 16K
    "default": EvalConfig(),
    # the fact-memory cells of benchmarks/results/facts.md for the bounded model: single facts of every kind at
    # 4K and 16K, and five facts in one 16K document, 20 trials each (scripts/device_eval_facts.sh splits them
    # over three processes)
    "facts": EvalConfig(
        methods=["coda-bounded"],
        texts=["wikipedia"],
        lengths=[2048],
        trials=0,
        fact_trials=20,
        fact_lengths=[4096, 16384],
        fact_multi=5,
        batch=20,
    ),  # fmt: skip
    # the tiny random Llama on byte text (tests)
    "smoke": EvalConfig(
        tiny_model=True, config="tiny", num_sink=2, lengths=[256, 512], passkey_lengths=[512], trials=2, batch=2
    ),  # fmt: skip
}
