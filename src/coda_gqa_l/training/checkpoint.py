"""Training checkpoints: the trained parameters and their AdamW state in safetensors, the rest
(phase, step, arguments, log position) in its JSON metadata. The frozen base is never saved,
so a checkpoint of SmolLM2 with LoRA is a few MB and travels through ``$OUT``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "coda-gqa-l/train-checkpoint"


def save_checkpoint(
    path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, meta: dict[str, Any]
) -> Path:
    states = {name: optimizer.state.get(param, {}) for name, param in params.items()}
    return write_checkpoint(path, {n: p.detach() for n, p in params.items()}, states, meta)


def write_checkpoint(
    path: Path, params: dict[str, torch.Tensor], states: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> Path:
    """Write parameters and their AdamW state (``exp_avg``, ``exp_avg_sq``, ``step``) by name."""
    from safetensors.torch import save_file

    tensors = {f"param/{n}": p.float().cpu().contiguous() for n, p in params.items()}
    for name, state in states.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam/{key}/{name}"] = state[key].detach().float().cpu().contiguous()
        if "step" in state:
            tensors[f"adam/step/{name}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"coda_gqa_l": json.dumps({"format": FORMAT, **meta})})
    os.replace(partial, path)  # a crash mid-write leaves the previous checkpoint intact
    return path


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {}).get("coda_gqa_l", "{}"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a coda-train checkpoint")
    return meta


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Copy a checkpoint's parameters and AdamW state into ``params`` / ``optimizer``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        expected = {f"param/{n}" for n in params}
        saved = {n for n in names if n.startswith("param/")}
        if saved != expected:
            missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
            raise ValueError(
                f"{path} was saved with other trainable parameters (missing {missing}, unexpected {extra}); "
                "resume with the same --trainable, --config and LoRA settings"
            )
        with torch.no_grad():
            for name, param in params.items():
                value = handle.get_tensor(f"param/{name}")
                if value.shape != param.shape:
                    raise ValueError(f"{path}: {name} is {tuple(value.shape)}, the model's {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))
                state: dict[str, Any] = {}
                for key in ("exp_avg", "exp_avg_sq"):
                    if f"adam/{key}/{name}" in names:
                        state[key] = handle.get_tensor(f"adam/{key}/{name}").to(param.device, torch.float32)
                if f"adam/step/{name}" in names:
                    state["step"] = handle.get_tensor(f"adam/step/{name}").reshape(())
                if state:
                    optimizer.state[param] = state
