"""CoDA weights files: the trained CoDA (and LoRA) parameters of a converted model, never its base.

A file is safetensors with JSON metadata: what the base model is, how it was converted (the
bounded config, head norm), the LoRA settings and how it was trained. ``apply_coda_weights``
converts a fresh base model the same way and loads the tensors, refusing a file made for
another model or config with an error that names the difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BoundedConfig, check_routing_names
from .convert import convert
from .lora import INFERENCE_ONLY, add_lora, lora_settings
from .params import saved_parameters

FORMAT = "coda-gqa-l/weights"
VERSION = 1


class WeightsFileError(ValueError):
    """A CoDA weights file that cannot be applied (corrupt, another model, another config)."""


def save_coda_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    base: str,
    training: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write the CoDA and LoRA parameters of a converted ``model`` to ``path`` (atomically)."""
    settings = getattr(getattr(model, "config", None), "coda_gqa_l", None)
    if not settings:
        raise ValueError("the model is not converted (no config.coda_gqa_l): nothing to save")
    if getattr(model, INFERENCE_ONLY, False):
        raise ValueError(
            "the model was folded for inference (LoRA merged or products fused: lora.merge_lora, "
            "inference.fold_for_inference), so its parameters no longer split into base weights and adapters; "
            "save from a model loaded without folding (load_coda_smollm2(merge_adapters=False))"
        )
    tensors = {name: p.detach().to("cpu", dtype).contiguous() for name, p in saved_parameters(model).items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base": base,
        "base_config": _base_identity(model),
        "convert": settings,
        "lora": lora_settings(model),
        "training": training or {},
    }
    return _write(tensors, meta, path)


def _write(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically: a failed write leaves an existing file at ``path`` as it was."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, str(partial), metadata={"coda_gqa_l": json.dumps(meta)})
    os.replace(partial, target)
    return target


def retune_weights_file(
    source: str | os.PathLike[str], target: str | os.PathLike[str], thresholds: dict[str, float], reason: str
) -> Path:
    """Copy a bounded weights file with other bank-routing thresholds (``config.ROUTING_THRESHOLDS``).

    The tensors are copied unchanged; the file's bounded config takes the new values, and its
    training record keeps the values it was trained with, the new ones and ``reason``, so that
    a model loaded from it routes as measured and says why.
    """
    tensors, meta = read_coda_weights(source)
    bounded = meta["convert"].get("bounded")
    if not bounded:
        raise WeightsFileError(f"{source} holds unbounded (phase-1) weights: it has no bank routing to retune")
    check_routing_names(thresholds)
    retuned = BoundedConfig(**{**bounded, **thresholds}).to_dict()  # validates
    record = {"from": {k: bounded[k] for k in thresholds}, "to": dict(thresholds), "reason": reason}
    meta["convert"] = {**meta["convert"], "bounded": retuned}
    meta["training"] = {
        **meta.get("training", {}),
        "routing_retuned": [*meta.get("training", {}).get("routing_retuned", []), record],
    }
    return _write(tensors, meta, target)


def average_weights_files(
    first: str | os.PathLike[str],
    second: str | os.PathLike[str],
    target: str | os.PathLike[str],
    share_first: float = 0.5,
) -> Path:
    """Write the tensor-by-tensor mean ``share_first * first + (1 - share_first) * second`` (a "model soup").

    Meant for two files trained from the same starting file (same base, LoRA rank and bank
    configuration): their LoRA factors then stay close and the mean lies between the two runs
    (benchmarks/results/facts.md, "Weight averages"). The output keeps the files' shared
    configuration and records both training histories with their shares.
    """
    if not 0.0 <= share_first <= 1.0:
        raise WeightsFileError(f"share_first must be between 0 and 1, got {share_first}")
    (first_tensors, first_meta), (second_tensors, second_meta) = read_coda_weights(first), read_coda_weights(second)
    for field in ("base", "base_config", "convert", "lora"):
        if first_meta.get(field) != second_meta.get(field):
            raise WeightsFileError(f"{first} and {second} differ in {field!r}: they cannot be averaged")
    if first_tensors.keys() != second_tensors.keys():
        only = sorted(first_tensors.keys() ^ second_tensors.keys())
        raise WeightsFileError(f"{first} and {second} hold different tensors (e.g. {only[:3]})")
    mean = {}
    for name, tensor in first_tensors.items():
        other = second_tensors[name]
        if tensor.shape != other.shape or tensor.dtype != other.dtype:
            raise WeightsFileError(
                f"{name}: {tuple(tensor.shape)} {tensor.dtype} in {first}, "
                f"{tuple(other.shape)} {other.dtype} in {second}"
            )
        mixed = share_first * tensor.float() + (1.0 - share_first) * other.float()  # one rounding to bfloat16
        mean[name] = mixed.to(tensor.dtype).contiguous()
    meta = {
        **second_meta,
        "training": {
            "averaged_from": [
                {"file": Path(first).name, "share": share_first, "training": first_meta.get("training")},
                {"file": Path(second).name, "share": 1.0 - share_first, "training": second_meta.get("training")},
            ]
        },
    }
    return _write(mean, meta, target)


def read_coda_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a weights file (safetensors: nothing is unpickled)."""
    return _read(path, with_tensors=True)


def read_coda_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a weights file alone (how it was converted and trained), without its tensors."""
    return _read(path, with_tensors=False)[1]


def _read(path: str | os.PathLike[str], with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"CoDA weights file {source} does not exist")
    try:
        with safe_open(str(source), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("coda_gqa_l")
            names = list(handle.keys()) if with_tensors else []
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError) as exc:
        raise WeightsFileError(f"{source} is not a readable safetensors file: {exc}") from exc
    if raw is None:
        raise WeightsFileError(f"{source} has no coda_gqa_l metadata: it is not a CoDA weights file")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WeightsFileError(f"{source}: corrupt coda_gqa_l metadata ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = f"{meta.get('format')!r} v{meta.get('version')}"
        raise WeightsFileError(f"{source}: format {found}, expected {FORMAT!r} v{VERSION}")
    return tensors, meta


def apply_coda_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Convert a base ``model`` as the file says, add its LoRA, load its tensors; returns the model."""
    tensors, meta = read_coda_weights(path)
    expected, found = meta["base_config"], _base_identity(model)
    if expected != found:
        diff = {k: (expected.get(k), found.get(k)) for k in sorted(set(expected) | set(found))}
        diff = {k: pair for k, pair in diff.items() if pair[0] != pair[1]}
        raise WeightsFileError(f"{path} was trained on another base model ({meta['base']}); (file, model): {diff}")
    settings = meta["convert"]
    bounded = BoundedConfig(**settings["bounded"]) if settings.get("bounded") else None
    convert(
        model,
        bounded,
        differential=settings.get("differential", True),
        head_norm=settings.get("head_norm", "identity"),
        exact_identity=settings.get("exact_identity", False),
    )
    if meta.get("lora"):
        add_lora(model, rank=int(meta["lora"]["rank"]), alpha=float(meta["lora"]["alpha"]))
    params = saved_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise WeightsFileError(
            f"{path} does not match the converted model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tensors[name].shape != param.shape:
                shapes = f"{tuple(tensors[name].shape)} in the file, {tuple(param.shape)} in the model"
                raise WeightsFileError(f"{path}: {name} has shape {shapes}")
            param.copy_(tensors[name].to(param.dtype))
    return model


def _base_identity(model: nn.Module) -> dict[str, Any]:
    """The base model's shape, enough to refuse weights trained on another model."""
    config = getattr(model, "config", None)
    keys = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"]
    keys.append("rope_theta")
    identity = {k: getattr(config, k, None) for k in keys}
    if identity["rope_theta"] is None:  # transformers 5 keeps it in rope_parameters
        rope = getattr(config, "rope_parameters", None) or {}
        identity["rope_theta"] = rope.get("rope_theta") if isinstance(rope, dict) else None
    return identity
