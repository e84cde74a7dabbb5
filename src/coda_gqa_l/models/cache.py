"""``BoundedCache``: a ``transformers`` Cache whose per-layer content is a ``BoundedState``.

Pass it to a converted bounded model's ``forward`` or ``generate``::

    cache = BoundedCache(model)
    out = model.generate(input_ids, cache=cache, max_new_tokens=100)

(``past_key_values=cache`` with transformers before 5.24; ``hf_compat.cache_kwargs(cache)``
gives the right keyword for the installed release.)

Its memory is fixed: ``cache.nbytes()`` is the same after 100 tokens and after 100,000.
``save`` / ``load`` write and read the states of all layers as one state file (docs/state_files.md), with
the model's fingerprint, so that a state is only ever continued by the model that made it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention import BoundedCoDAAttention
from ..state import BoundedState
from ..statefile import load_state, save_state


class BoundedCacheLayer(CacheLayerMixin):
    """One layer's bounded state; the key/value interface of dynamic caches is not used."""

    is_compileable = False
    is_sliding = False

    def __init__(self) -> None:
        super().__init__()
        self.state: BoundedState | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise TypeError("a BoundedCacheLayer is filled by CoDA adapters, not by key/value updates")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise TypeError(
            "this model layer wrote plain keys/values into a BoundedCache: convert every attention layer with "
            "coda_gqa_l.convert(model, config) before using a BoundedCache"
        )

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.pos

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._select(torch.arange(self.state.batch_size).repeat_interleave(repeats))

    def _select(self, rows: Tensor) -> None:
        if self.state is None:
            return
        rows = rows.to(self.state.device)
        fields = {name: t.index_select(0, rows) for name, t in self.state.tensors().items()}
        self.state = self.state.replace(**fields)

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class BoundedCache(Cache):
    """Per-layer bounded states of a converted model (see the module docstring).

    Args:
        model: a model converted with ``convert(model, config)`` (used for the layer count).
        num_layers: instead of ``model``.
        block_size: prefill block size used by the layers (does not change results).
    """

    def __init__(
        self, model: torch.nn.Module | None = None, num_layers: int | None = None, block_size: int = 1024
    ) -> None:
        if num_layers is None:
            if model is None:
                raise ValueError("BoundedCache needs a model or num_layers")
            model_config: Any = model.config
            num_layers = int(model_config.num_hidden_layers)
        super().__init__(layers=[BoundedCacheLayer() for _ in range(num_layers)])
        self.block_size = block_size

    @property
    def bounded_layers(self) -> list[BoundedCacheLayer]:
        return [layer for layer in self.layers if isinstance(layer, BoundedCacheLayer)]

    def state_for(self, layer_idx: int, module: BoundedCoDAAttention, batch_size: int) -> BoundedState:
        """The state of ``layer_idx``, created empty for ``module`` on first use."""
        layer = self.layers[layer_idx]
        assert isinstance(layer, BoundedCacheLayer)
        if layer.state is None:
            layer.state = module.init_state(batch_size)
        return layer.state

    def set_state(self, layer_idx: int, state: BoundedState) -> None:
        layer = self.layers[layer_idx]
        assert isinstance(layer, BoundedCacheLayer)
        layer.state = state

    @property
    def states(self) -> list[BoundedState | None]:
        return [layer.state for layer in self.bounded_layers]

    def nbytes(self) -> int:
        """Bytes held by all layers' states: fixed, whatever the number of tokens seen."""
        return sum(state.nbytes() for state in self.states if state is not None)

    def fork(self) -> BoundedCache:
        """An independent copy: follow-up questions on a stored state without changing it."""
        copy = BoundedCache(num_layers=len(self.layers), block_size=self.block_size)
        for mine, theirs in zip(self.bounded_layers, copy.bounded_layers, strict=True):
            theirs.state = None if mine.state is None else mine.state.clone()
        return copy

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        model_fingerprint: str,
        extra: dict[str, Any] | None = None,
        int8: bool = False,
    ) -> None:
        """Write every layer's state to one state file (atomic; see ``statefile``)."""
        states = self.states
        if any(state is None for state in states):
            raise ValueError("the cache holds no state yet: run the model on some tokens first")
        save_state(
            path, [s for s in states if s is not None], model_fingerprint=model_fingerprint, int8=int8, extra=extra
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: torch.nn.Module,
        *,
        model_fingerprint: str,
        device: torch.device | str | None = None,
    ) -> BoundedCache:
        """Read a state file written by ``save`` for this model (checked before anything is used)."""
        modules = bounded_modules(model)
        weight = next(model.parameters())
        loaded = load_state(
            path,
            config=[m.config for m in modules],
            model_fingerprint=model_fingerprint,
            dtype=weight.dtype,
            device=device if device is not None else weight.device,
        )
        states = loaded if isinstance(loaded, list) else [loaded]
        cache = cls(model)
        for layer, state in zip(cache.bounded_layers, states, strict=True):
            layer.state = state
        return cache


def new_cache(model: torch.nn.Module, bounded: bool, block_size: int = 1024) -> Cache:
    """An empty cache for reading a stream: a ``BoundedCache`` for a bounded model, else transformers' DynamicCache."""
    from transformers import DynamicCache

    if bounded:
        return BoundedCache(model, block_size=block_size)
    return DynamicCache(config=model.config)  # type: ignore[arg-type]


def bounded_modules(model: torch.nn.Module) -> list[BoundedCoDAAttention]:
    """The bounded layers of a converted model, in layer order."""
    found = [m for m in model.modules() if isinstance(m, BoundedCoDAAttention)]
    if not found:
        raise ValueError("the model has no bounded CoDA layers: convert it with coda_gqa_l.convert(model, config)")
    return found
