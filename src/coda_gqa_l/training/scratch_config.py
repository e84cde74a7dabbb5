"""``ScratchConfig``: every setting of a from-scratch run (``coda-scratch``), as one dataclass.

The command line fills it (``training/scratch.py``); benchmarks and tests build it directly, by
name or from a preset, and pass it to ``scratch_trainer.train`` or ``scratch_model.build_model``.
Field names are the command line's option names with ``_`` for ``-``: a checkpoint's metadata
records them under those names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..run_settings import RunSettings

ATTENTIONS = ("gqa", "coda", "coda-bounded")


@dataclass
class ScratchConfig(RunSettings):
    """A from-scratch run: model shape, data, optimiser, budget, evaluation and where it writes.

    At least one budget (``time_budget``, ``token_budget``, ``max_steps``) must be given before it
    trains (``check``); the defaults are the command line's."""

    attention: str = "coda"
    depth: int = 8
    width: int = 512
    heads: int = 8
    kv_heads: int = 4
    ffn: int = 1408
    seq_len: int = 1024
    config: str = "medium"  # the bounded preset of coda-bounded
    num_sink: int = 4
    lambda_init: float = 0.5
    tokenizer: str = "smollm2"
    global_batch: int = 32
    micro_batch: int | None = None
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    time_budget: float | None = None
    token_budget: int | None = None
    max_steps: int | None = None
    eval_every: int = 100
    val_tokens: int = 131072
    retrieval_fraction: float = 0.0
    passkey_trials: int = 0
    passkey_lengths: list[int] | None = None
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.4])
    fsdp: bool = False
    compile: bool = False
    seed: int = 0
    device: str | None = None
    out: Path = Path("runs/coda-scratch")
    cache_dir: Path | None = None

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot train."""
        if self.time_budget is None and self.token_budget is None and self.max_steps is None:
            raise ValueError("give a budget: --time-budget, --token-budget or --max-steps")
        self.check_model()

    def check_model(self) -> None:
        """Raise ValueError naming the first setting that cannot build the model (no budget needed)."""
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {list(ATTENTIONS)}")
        if self.width % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"--width {self.width}, --heads {self.heads}, --kv-heads {self.kv_heads} do not divide")


ScratchConfig.PRESETS = {
    # the command line's defaults: a 8 x 512 Llama on SmolLM2's tokenizer (results/from_scratch.md)
    "default": ScratchConfig(),
    # a two-layer byte model that trains in seconds on a CPU (tests, smoke runs)
    "smoke": ScratchConfig(
        tokenizer="bytes",
        depth=2,
        width=64,
        heads=4,
        kv_heads=2,
        ffn=128,
        seq_len=256,
        global_batch=4,
        val_tokens=2048,
        config="tiny",
        num_sink=2,
        max_steps=2,
    ),  # fmt: skip
}
