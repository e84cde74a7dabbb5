"""The methods coda-eval compares, each built on the same base model (docs/evaluation.md): the
original with a full cache, the window and StreamingLLM baselines, and the CoDA and plain-GQA
weights files read bounded or with a full cache (the factorial).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from ..baseline import BaselineGQA, CoDAGQA
from ..config import BoundedConfig
from ..models.adapters import CoDAAttentionAdapter
from ..models.convert import convert, to_bounded
from ..models.inference import fold_for_inference
from ..models.lora import merge_lora
from ..models.weights import apply_coda_weights, read_coda_meta
from .eval_config import EvalConfig


def build_method(name: str, args: EvalConfig, base: Callable[[], nn.Module]) -> tuple[nn.Module, bool]:
    """The model of one method (``METHODS``) built on a fresh copy of the base (``base()``), and
    whether it reads through a bounded state; ``args`` gives the preset, sinks and weights files."""
    preset = BoundedConfig.preset(args.config, num_sink=args.num_sink)
    slots = preset.storage_slots
    model = base()
    if name == "original":
        return model, False
    if name == "window":  # every slot in the window
        return convert(model, plain_window(slots, 0)), True
    if name == "streaming":  # 4 sinks, the rest of the slots in the window
        return convert(model, plain_window(slots - 4, 4)), True
    differential, bounded = name.startswith("coda-"), name.endswith("-bounded")
    weights = args.weights if differential else args.gqa_weights
    if weights is None:  # the cold swap
        config = dataclasses.replace(preset, differential=differential) if bounded else None
        return convert(model, config, differential=differential), bounded
    meta = read_coda_meta(weights)
    if bool(meta["convert"].get("differential", True)) != differential:
        kind = "differential (CoDA)" if differential else "plain GQA"
        raise ValueError(f"{name} needs {kind} weights; {weights} holds the other kind (see coda-train --attention)")
    model = apply_coda_weights(model, weights)
    merge_lora(model)  # evaluation only reads: one product per projection (models/lora.py)
    trained_bounded = bool(meta["convert"].get("bounded"))
    if not bounded and trained_bounded:
        # the trained core with a full cache (the write gate and EMA rate go unused)
        return _unbound(model), False
    if bounded and not trained_bounded:  # phase 1 only: the banks are new, as in a cold swap
        to_bounded(model, preset)
    if bounded:
        fold_for_inference(model)  # the bounded layers' and MLPs' products merged (models/inference.py)
    return model, bounded


# The baselines' window advances 4 tokens at a time: it always shows 377 to 380 of StreamingLLM's
# 380 recent tokens (the real method shows exactly 380; segments of 64 would show 317 to 380, and
# a window rounded down to a multiple of 64 would waste storage).
BASELINE_SEGMENT = 4


def plain_window(window: int, sinks: int) -> BoundedConfig:
    """A baseline of ``sinks + window`` slots: plain attention over sinks and a recent window, no banks."""
    if window % BASELINE_SEGMENT:
        raise ValueError(f"a baseline window of {window} slots is not a multiple of {BASELINE_SEGMENT}")
    return BoundedConfig(window=window, num_landmarks_exact=0, num_landmarks_summary=0, num_sink=sinks,
                         segment=BASELINE_SEGMENT, differential=False)  # fmt: skip


def _unbound(model: nn.Module) -> nn.Module:
    """A bounded model's layers as unbounded attention with the same core (full cache): CoDA for a
    differential core, plain GQA for the factorial's control."""
    for adapter in (m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)):
        core = adapter.layer.core  # type: ignore[union-attr]
        kind = CoDAGQA if core.differential else BaselineGQA
        layer = kind(core.embed_dim, core.num_heads, core.num_kv_heads, head_dim=core.head_dim)
        layer.core = core
        adapter.layer = layer.to(core.q_proj.weight.device, core.q_proj.weight.dtype)
    config: Any = model.config
    config.use_cache = True
    config.coda_gqa_l = dict(config.coda_gqa_l, bounded=None)
    return model
