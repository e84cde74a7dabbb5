"""The one place that knows how each transformers release names the cache argument.

transformers 5.24 renamed the cache keyword of models, attention modules and ``generate()``
from ``past_key_values`` to ``cache`` (the old name warns until 5.40). We support both sides of
the rename (``transformers>=5.17``); everything in this package that hands a cache to a model
goes through these helpers, so a version check never appears anywhere else::

    model(ids, **cache_kwargs(cache), use_cache=True)
    model.generate(ids, **cache_kwargs(cache), max_new_tokens=32)

The choice is made by looking at the installed release's ``LlamaModel.forward`` signature,
not at its version number, so a backport or a pre-release follows what the code really takes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NEW_CACHE_ARGUMENT = "cache"
OLD_CACHE_ARGUMENT = "past_key_values"
# Every name under which a transformers release has handed an attention module its cache.
CACHE_ARGUMENTS = (NEW_CACHE_ARGUMENT, OLD_CACHE_ARGUMENT, "past_key_value")


@functools.lru_cache(maxsize=1)
def cache_argument() -> str:
    """The keyword the installed transformers takes for a cache: ``"cache"`` (5.24+) or ``"past_key_values"``."""
    from transformers.models.llama.modeling_llama import LlamaModel

    parameters = inspect.signature(LlamaModel.forward).parameters
    return NEW_CACHE_ARGUMENT if NEW_CACHE_ARGUMENT in parameters else OLD_CACHE_ARGUMENT


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the installed transformers' keyword, for ``model(...)`` and ``generate(...)``."""
    return {cache_argument(): cache}


def generate_output_cache(cache: Any) -> dict[str, Any]:
    """``{field: cache}`` for a ``GenerateDecoderOnlyOutput``: the field was renamed with the argument."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    fields = {field.name for field in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return {NEW_CACHE_ARGUMENT if NEW_CACHE_ARGUMENT in fields else OLD_CACHE_ARGUMENT: cache}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Take the cache out of an attention module's keyword arguments, whichever name it came under.

    Raises ``TypeError`` when two names carry different caches: silently picking one would
    write the state into the wrong object.
    """
    found = [(name, kwargs.pop(name)) for name in CACHE_ARGUMENTS if name in kwargs]
    given = [(name, value) for name, value in found if value is not None]
    if len({id(value) for _, value in given}) > 1:
        names = ", ".join(name for name, _ in given)
        raise TypeError(f"an attention layer was given two different caches ({names}); pass one")
    return given[0][1] if given else None
