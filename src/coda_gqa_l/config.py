"""Configuration of the bounded state: slot counts, routing thresholds, presets, validation.

One frozen dataclass, `BoundedConfig`, holds every parameter of docs/semantics.md sections 2 to 4 that is
not a learned weight. It is validated when built, carried by every state and recorded in every
state file, so that a state can only ever be continued by a module with the same configuration.

Presets follow the seeds: ``tiny`` (window 128, 32 exact, 32 summary), ``medium`` (256/64/64)
and ``large`` (512/128/128). ``BoundedConfig.preset("medium", num_sink=4)`` takes the sinks out
of the exact bank so that the storage budget stays the same (4 + 256 + 60 + 64 = 384).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

PositionMode = Literal["relative", "absolute"]
MAX_SLOTS = 1 << 20  # slots of one kind per layer and KV head; far above any real config

PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (128, 32, 32),
    "medium": (256, 64, 64),
    "large": (512, 128, 128),
}


@dataclass(frozen=True)
class BoundedConfig:
    """Everything about the bounded state that is not a learned weight.

    Attributes:
        window: recent-window slots ``W`` (a ring); must be a multiple of ``segment``.
        num_landmarks_exact: exact landmark bank slots ``Me``.
        num_landmarks_summary: summary (EMA prototype) bank slots ``Ms``.
        num_sink: StreamingLLM sink slots, the first tokens, kept forever.
        segment: segment length ``S``; 0 (the default) means ``min(64, W // 4)``. Banks are updated
            once per segment, with the ``S`` tokens that just left the window.
        tau_exact: write-gate threshold for exact-bank candidates (``g > tau_exact``).
        tau_summary: write-gate threshold for summary-bank candidates.
        novelty: a candidate is novel when its best value cosine to the bank and to every
            higher-gated candidate of its segment is below this.
        match: a candidate whose best value cosine to the bank is at least this is a hit.
        max_inserts: most exact-bank inserts per segment.
        gate_bias_init: initial bias of the write gate (``sigmoid(-2) = 0.12``).
        summary_rate_logit_init: initial logit of the per-KV-head EMA rate ``eta``.
        position_mode: ``relative`` (bank keys kept before RoPE and placed just before the
            window; distances stay bounded) or ``absolute`` (keys rotated at their true
            position when written, like the public package; for comparison only).
        differential: ``False`` gives bounded plain GQA (signal stream only).
    """

    window: int = 256
    num_landmarks_exact: int = 64
    num_landmarks_summary: int = 64
    num_sink: int = 0
    segment: int = 0
    tau_exact: float = 0.1
    tau_summary: float = 0.0
    novelty: float = 0.70
    match: float = 0.90
    max_inserts: int = 8
    gate_bias_init: float = -2.0
    summary_rate_logit_init: float = -3.0
    position_mode: PositionMode = "relative"
    differential: bool = True

    def __post_init__(self) -> None:
        if not self.segment:  # 0 (or None from older callers): derived from the window
            object.__setattr__(self, "segment", max(1, min(64, self.window // 4)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (its type too: a config can come from a file)."""
        W, S = self.window, self.segment
        for name in ("window", "segment", "max_inserts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLOTS:
                raise ValueError(f"{name} must be an int from 1 to {MAX_SLOTS}, got {value!r}")
        for name in ("num_landmarks_exact", "num_landmarks_summary", "num_sink"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SLOTS:
                raise ValueError(f"{name} must be an int from 0 to {MAX_SLOTS}, got {value!r}")
        for name in ("tau_exact", "tau_summary", "novelty", "match", "gate_bias_init", "summary_rate_logit_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.differential, bool):
            raise ValueError(f"differential must be true or false, got {self.differential!r}")
        if W % S != 0:
            raise ValueError(f"window ({W}) must be a multiple of segment ({S})")
        if S > W // 4:
            raise ValueError(f"segment ({S}) must be at most window / 4 = {W // 4}")
        if self.num_sink >= W:
            raise ValueError(f"num_sink ({self.num_sink}) must be smaller than window ({W})")
        if not -1.0 <= self.novelty <= self.match <= 1.0:
            raise ValueError(f"need -1 <= novelty <= match <= 1, got novelty={self.novelty}, match={self.match}")
        for name in ("tau_exact", "tau_summary"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.position_mode not in ("relative", "absolute"):
            raise ValueError(f"position_mode must be 'relative' or 'absolute', got {self.position_mode!r}")

    @classmethod
    def preset(cls, name: str, *, num_sink: int = 0, **overrides: Any) -> BoundedConfig:
        """A named preset; ``num_sink`` sinks are taken out of the exact bank."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        window, exact, summary = PRESETS[name]
        if num_sink > exact:
            raise ValueError(f"num_sink ({num_sink}) exceeds the exact bank of preset {name!r}")
        return cls(
            window=window,
            num_landmarks_exact=exact - num_sink,
            num_landmarks_summary=summary,
            num_sink=num_sink,
            **overrides,
        )

    @property
    def storage_slots(self) -> int:
        """Slots stored per layer and KV head: sinks + window + exact + summary."""
        return self.num_sink + self.window + self.num_landmarks_exact + self.num_landmarks_summary

    @property
    def visible_slots(self) -> tuple[int, int]:
        """(fewest, most) slots a query can see once the state is full.

        The recent part a query sees shrinks to ``W - S + 1`` at the start of a segment and
        grows to ``W`` at its end.
        """
        banks = self.num_sink + self.num_landmarks_exact + self.num_landmarks_summary
        return banks + self.window - self.segment + 1, banks + self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoundedConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BoundedConfig fields: {unknown}")
        return cls(**data)


# Bank-routing thresholds that change no tensor shape and no learned weight, so a trained model can
# be read with other values (docs/semantics.md section 4: thresholds are tuned by measurement).
ROUTING_THRESHOLDS = ("tau_exact", "tau_summary", "novelty", "match", "max_inserts")


def check_routing_names(names: Iterable[str]) -> None:
    """Raise ValueError naming any that is not one of ``ROUTING_THRESHOLDS``."""
    unknown = sorted(set(names) - set(ROUTING_THRESHOLDS))
    if unknown:
        raise ValueError(f"not a routing threshold: {unknown}; choose from {list(ROUTING_THRESHOLDS)}")


def parse_routing(items: list[str]) -> dict[str, Any]:
    """``["novelty=0.85", "max_inserts=12"]`` (a command line's ``--routing``) as keyword arguments."""
    parsed: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in ROUTING_THRESHOLDS:
            raise ValueError(f"--routing takes NAME=VALUE with NAME in {list(ROUTING_THRESHOLDS)}, got {item!r}")
        try:
            parsed[name] = int(value) if name == "max_inserts" else float(value)
        except ValueError:
            raise ValueError(f"--routing {name} needs a number, got {value!r}") from None
    return parsed


def chunk_segments(start: int, n: int, seg: int) -> range:
    """First token of every segment a chunk of ``n`` tokens from ``start`` touches (one snapshot each)."""
    return range(start // seg * seg, start + n, seg)
