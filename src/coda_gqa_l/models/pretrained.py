"""The shipped CoDA weights for SmolLM2-135M-Instruct, loaded on top of the packaged base model.

    model, tokenizer = load_coda_smollm2()

The file holds only what training changed (CoDA parameters and LoRA, about 2 MB); the base
comes from its package (``models.loader``). How it was trained is in its metadata
(``read_coda_meta(SHIPPED_WEIGHTS)["training"]``) and in ``benchmarks/results/facts.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BoundedConfig
from ..fetch import sha256_file
from ..version import __version__
from .inference import fold_for_inference
from .loader import load_smollm2
from .weights import apply_coda_weights, read_coda_meta

SHIPPED_WEIGHTS = Path(__file__).parent.parent / "weights" / "smollm2-135m-instruct-coda.safetensors"


def shipped_weights_label() -> str:
    """A name for the shipped weights that changes with them: file name, the package version that ships them and
    the first 12 hex digits of the file's SHA-256.

    The neural database records it with every state, so a store made with older weights is refused by name."""
    return f"{SHIPPED_WEIGHTS.name} of coda-gqa-l {__version__} sha256:{sha256_file(SHIPPED_WEIGHTS)[:12]}"


def shipped_config() -> BoundedConfig:
    """The bounded config the shipped weights are read with (their training record says what they were trained with)."""
    meta = read_coda_meta(SHIPPED_WEIGHTS)
    return BoundedConfig(**meta["convert"]["bounded"])


def load_coda_smollm2(
    dtype: torch.dtype = torch.float32, progress: bool = True, merge_adapters: bool = True
) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct converted to bounded CoDA with the shipped trained weights, and its tokenizer.

    ``merge_adapters`` (the default, for inference) folds the LoRA adapters into their projections and merges the
    products that read the same input (``inference.fold_for_inference``): the same function with fewer kernels per
    step. ``False`` keeps the model as trained, to train further."""
    base, tokenizer = load_smollm2(dtype=dtype, progress=progress)
    model = apply_coda_weights(base, SHIPPED_WEIGHTS).eval()
    if merge_adapters:
        fold_for_inference(model)
    return model, tokenizer
