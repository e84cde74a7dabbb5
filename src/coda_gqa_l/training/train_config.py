"""``TrainConfig``: every setting of a ``coda-train`` run (two-phase training of a converted model),
as one dataclass.

The command line fills it (``training/cli.py``); benchmarks and scripts build it directly, by name
or from a preset, and pass it to ``trainer.train``. Field names are the command line's option names
with ``_`` for ``-``: a checkpoint's metadata records them under those names, and ``--resume``
compares them (``trainer.RESUME_MUST_MATCH``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..data.facts import VALUE_FIRST_KEEP
from ..data.training_rows import FACT_COUNTS
from ..models.pretrained import SHIPPED_WEIGHTS
from ..run_settings import RunSettings
from .gate_supervision import REFUSE_MODES

ATTENTIONS = ("coda", "gqa")
TRAINABLE = ("coda", "coda+lora")


@dataclass
class TrainConfig(RunSettings):
    """A coda-train run: model, data mix, phases, optimiser, the write-gate hinge, distillation,
    budget and where it writes (docs/training.md). The defaults are the command line's."""

    # --from-scratch is an option of the command line, not a setting: it hands over to coda-scratch
    NOT_SETTINGS: ClassVar[tuple[str, ...]] = ("from_scratch",)

    model: str = "smollm2"
    corpus: str = "wikipedia"
    attention: str = "coda"
    config: str = "medium"  # the bounded preset of phase 2
    num_sink: int = 4
    routing: list[str] = field(default_factory=list)  # NAME=VALUE bank-routing thresholds
    trainable: str = "coda+lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    phase1_steps: int = 100
    phase2_steps: int = 300
    seq_len: int = 1024
    phase2_seq_len: int = 2048
    batch_size: int = 4
    accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    retrieval_fraction: float = 0.5
    fact_fraction: float = 0.0
    fact_counts: list[int] = field(default_factory=lambda: list(FACT_COUNTS))
    value_first_share: float | None = None
    value_first_keep: str = "value"
    recurring_keep: bool = False
    needle_distance: int | None = None
    answer_weight: float = 1.0
    gate_weight: float = 1.0
    gate_keep: float = 0.6
    gate_drop: float = 0.01
    gate_refuse: str = "tokens"
    gate_lr: float | None = None
    distill_weight: float = 0.0
    seed: int = 0
    dtype: str = "bfloat16"
    device: str | None = None
    out: Path = Path("runs/coda-train")
    weights: Path | None = None
    resume: bool = False
    init_weights: Path | None = None
    save_every: int = 50
    time_budget: float | None = None
    tiny_model: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot train."""
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {list(ATTENTIONS)}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable {self.trainable!r} is not one of {list(TRAINABLE)}")
        if self.gate_refuse not in REFUSE_MODES:
            raise ValueError(f"gate_refuse {self.gate_refuse!r} is not one of {list(REFUSE_MODES)}")
        if self.value_first_keep not in VALUE_FIRST_KEEP:
            choices = ", ".join(VALUE_FIRST_KEEP)
            raise ValueError(f"--value-first-keep must be one of {choices}, got {self.value_first_keep!r}")
        if self.value_first_share is not None and not 0.0 <= self.value_first_share <= 1.0:
            raise ValueError(f"--value-first-share must be between 0 and 1, got {self.value_first_share}")


TrainConfig.PRESETS = {
    # the command line's defaults
    "default": TrainConfig(),
    # the tiny random Llama on byte text: two updates per phase, seconds on a CPU (tests, smoke runs)
    "smoke": TrainConfig(
        tiny_model=True,
        config="tiny",
        num_sink=2,
        phase1_steps=2,
        phase2_steps=2,
        seq_len=128,
        phase2_seq_len=512,
        batch_size=2,
        needle_distance=256,
    ),  # fmt: skip
    # the recipe of the shipped SmolLM2 file's last runs (benchmarks/results/facts.md): phase 2 from the shipped
    # file on many-fact rows with distillation to the original; --routing must repeat the file's thresholds
    "facts": TrainConfig(
        init_weights=SHIPPED_WEIGHTS,
        routing=["tau_exact=0.5", "novelty=0.9", "match=0.97", "max_inserts=16"],
        phase2_steps=2000,
        phase2_seq_len=2048,
        batch_size=16,
        retrieval_fraction=0.2,
        fact_fraction=0.6,
        fact_counts=[1, 2, 3, 4, 5, 6, 8, 10],
        gate_keep=0.8,
        lr=5e-4,
        gate_lr=5e-3,
        warmup=10,
        save_every=10,
        distill_weight=1.0,
        value_first_share=0.0,
    ),  # fmt: skip
}
