"""Teaching the write gate what to keep: a hinge loss on its logits in phase 2.

The exact bank only admits tokens whose gate exceeds ``tau_exact`` and evicts the least recently
used when full. Gradients through the bank writes reach the gate only through the ``log g``
offset of tokens already in a bank, so nothing tells it to refuse ordinary text: measured on the
weights shipped before it, every layer's gate stayed near its initial 0.12 (above ``tau_exact`` =
0.1) for almost every token, the bank took its 8 inserts per segment, and at a question it
held only the last 300 to 500 tokens before the window (benchmarks/results/retrieval.md, "Teaching the
write gate").

Retrieval documents say which tokens matter (their keys), so phase 2 can say it directly: a key
token's gate logit should reach ``logit(keep)`` and every other token's should fall to
``logit(drop)``. Hinges stop pushing once a token is on the right side, so the gate keeps what
the language-model loss asks of it elsewhere.

How the refusal side is averaged matters once keep targets are ambiguous. With ``refuse="tokens"``
it is a mean over all ordinary tokens, so a few dozen false writes in a 2,048-token row cost
little next to one missed key; training on value-first facts ("A brass astrolabe hangs ...": a
causal gate has no cue before the value) then raised 5-7x more ordinary tokens above
``tau_exact``, and at 16K they evicted the facts (benchmarks/results/facts.md, "Value-first rows flood
the exact bank"). ``refuse="violations"`` averages over the ordinary tokens still above
``drop`` only, so every false write weighs as much as a missed key does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..models.cache import bounded_modules


@contextmanager
def recorded_gate_logits(model: nn.Module, enabled: bool = True) -> Iterator[list[Tensor]]:
    """Collect every bounded layer's write-gate logits ``(B, L, Hkv)`` (with autograd) produced
    inside the block, in call order (nothing when not ``enabled``)."""
    logits: list[Tensor] = []
    if not enabled:
        yield logits
        return
    hooks = []
    for m in bounded_modules(model):
        if m.input_projection is not None:
            # a layer folded for inference computes the gate as the last columns of its one input product
            width = m.num_kv_heads
            hook = m.input_projection.register_forward_hook(lambda _m, _i, out, w=width: logits.append(out[..., -w:]))
        else:
            hook = m.gate_proj.register_forward_hook(lambda _m, _i, out: logits.append(out))
        hooks.append(hook)
    try:
        yield logits
    finally:
        for hook in hooks:
            hook.remove()


REFUSE_MODES = ("tokens", "violations")


def gate_hinge_loss(
    logits: list[Tensor], keep: Tensor, keep_prob: float, drop_prob: float, refuse: str = "tokens"
) -> Tensor:
    """Mean over layers of ``relu(logit(keep_prob) - z)`` over the key tokens plus
    ``relu(z - logit(drop_prob))`` over the others; ``keep (B, L)`` bool marks the keys. The
    refusal side is averaged over all other tokens (``refuse="tokens"``) or over those above
    ``drop_prob`` only (``"violations"``; see the module docstring)."""
    if refuse not in REFUSE_MODES:
        raise ValueError(f"refuse must be one of {REFUSE_MODES}, got {refuse!r}")
    if not logits:
        raise ValueError("no gate logits were recorded: is the model bounded (phase 2)?")
    if not 0.0 < drop_prob < keep_prob < 1.0:
        raise ValueError(f"need 0 < drop_prob < keep_prob < 1, got drop {drop_prob}, keep {keep_prob}")
    high, low = _logit(keep_prob), _logit(drop_prob)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for z in logits:
        if z.shape[:2] != keep.shape:
            raise ValueError(f"gate logits {tuple(z.shape)} do not match the keep mask {tuple(keep.shape)}")
        z = z.float()
        excess = torch.relu(z - low)[~keep]
        if refuse == "violations":
            total = total + excess.sum() / (excess > 0).sum().clamp(min=1)
        else:
            total = total + excess.mean()
        if keep.any():
            total = total + torch.relu(high - z)[keep].mean()
    return total / len(logits)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))
