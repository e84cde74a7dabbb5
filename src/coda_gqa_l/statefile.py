"""State files: bounded states on disk, safely (docs/state_files.md).

A state file is a safetensors file (never a pickle) with one JSON document in its metadata
under the key ``coda_gqa_l``: format version, package version, every routing parameter,
the caller's module config and model fingerprint, dtype, positions, layer count, and a SHA-256
checksum over that metadata and every tensor's name, dtype, shape and bytes.

Loading reads and checks everything (format, checksum, config, fingerprint, dtype, shapes)
before it returns anything, and raises ``StateFileError`` naming the problem. Writes go to a
temporary file in the same folder, are fsynced and renamed over the target, so a crash in the
middle of a save leaves the previous file intact.

Optional int8 storage keeps keys and values as int8 with one float32 scale per slot
(absmax / 127); the state loads back in its original dtype, approximately.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from .config import BoundedConfig
from .state import TENSOR_FIELDS, BoundedState
from .version import __version__

FORMAT_NAME = "coda-gqa-l/state"
FORMAT_VERSION = 1
METADATA_KEY = "coda_gqa_l"
QUANTIZABLE = ("sink_k", "sink_v", "win_k", "win_v", "ex_k", "ex_v", "sm_k", "sm_v")

# Migration from format version v to v + 1: (metadata, tensors) -> (metadata, tensors).
# A release that changes the format adds one entry, so older files stay readable.
Migration = Callable[[dict[str, Any], dict[str, Tensor]], tuple[dict[str, Any], dict[str, Tensor]]]
MIGRATIONS: dict[int, Migration] = {}

MAX_LAYERS = 4096  # far above any model; a claimed layer count is checked before anything is built from it
_DTYPES = {str(dt): dt for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class StateFileError(ValueError):
    """A state file that cannot be loaded here; the message says why."""


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of every parameter and buffer.

    Costs one pass over the weights: compute it once per loaded model and reuse it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: Tensor) -> None:
    t = tensor.detach().contiguous().cpu()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _checksum(meta: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    body = {key: value for key, value in meta.items() if key != "checksum"}
    digest.update(json.dumps(body, sort_keys=True).encode())
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-slot symmetric int8: ``x ~ q * scale``, scale of shape ``x.shape[:-1] + (1,)``."""
    x32 = x.float()
    scale = (x32.abs().amax(-1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    return (x32 / scale).round().clamp(-127, 127).to(torch.int8), scale


def save_state(
    path: str | os.PathLike[str],
    states: BoundedState | Sequence[BoundedState],
    *,
    module_config: dict[str, Any] | None = None,
    model_fingerprint: str | None = None,
    int8: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one state, or the states of all layers of a model, atomically to ``path``.

    Args:
        module_config: what built the layer(s) (shapes, RoPE); checked again on load.
        model_fingerprint: identifies the weights (``module_fingerprint``); checked on load.
        int8: store keys and values as int8 with per-slot scales (smaller, approximate).
        extra: any JSON-serialisable data to keep with the state (labels, token counts).
    """

    single = isinstance(states, BoundedState)
    layers: list[BoundedState] = [states] if isinstance(states, BoundedState) else list(states)
    if not layers:
        raise ValueError("save_state needs at least one state")
    for i, state in enumerate(layers):
        if not isinstance(state, BoundedState):
            raise TypeError(f"states[{i}] is a {type(state).__name__}, not a BoundedState")
    tensors: dict[str, Tensor] = {}
    for i, state in enumerate(layers):
        for name, tensor in state.tensors().items():
            key = f"layer{i}.{name}"
            data = tensor.detach().contiguous().cpu()
            if int8 and name in QUANTIZABLE:
                tensors[key + ".q8"], tensors[key + ".scale"] = _quantize(data)
            else:
                tensors[key] = data
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "single": single,
        "num_layers": len(layers),
        "configs": [state.config.to_dict() for state in layers],
        "positions": [state.pos for state in layers],
        "batch_size": layers[0].batch_size,
        "num_kv_heads": [state.num_kv_heads for state in layers],
        "head_dim": [state.head_dim for state in layers],
        "dtype": str(layers[0].dtype),
        "int8": bool(int8),
        "module_config": module_config,
        "model_fingerprint": model_fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extra": extra or {},
    }
    meta["checksum"] = _checksum(meta, tensors)
    payload = safetensors_save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(path), payload)


TEMP_SUFFIX = ".tmp"


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files of ``atomic_write_bytes`` in ``folder`` whose writing process no longer runs."""
    stale = []
    for candidate in folder.glob(f".*{TEMP_SUFFIX}"):
        parts = candidate.name.split(".")
        pid = next((int(p) for p in reversed(parts[:-2]) if p.isdigit()), None)
        if pid is None or not _process_alive(pid):
            stale.append(candidate)
    return stale


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    # the writer's process id is in the name, so a store can tell a dead writer's leftovers from a live write
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename itself is done
    finally:
        os.close(dir_fd)


def read_state_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a state file, after checking that it is one (tensors not verified)."""
    meta, _ = _read(Path(path), with_tensors=False)
    return meta


def _read(path: Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_file():
        raise StateFileError(f"{path}: no such state file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise StateFileError(
                    f"{path}: a safetensors file, but not a CoDA-GQA-L state (no {METADATA_KEY!r} metadata)"
                )
            tensors = {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else {}
    except StateFileError:
        raise
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise StateFileError(
            f"{path}: not a readable state file (truncated, corrupt or another format): {err}"
        ) from err
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise StateFileError(f"{path}: state metadata is corrupt: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StateFileError(
            f"{path}: not a CoDA-GQA-L state file (format {meta.get('format') if isinstance(meta, dict) else meta!r})"
        )
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise StateFileError(f"{path}: state metadata has no format version")
    if version > FORMAT_VERSION:
        raise StateFileError(
            f"{path}: written with state format version {version}; this package reads versions up to "
            f"{FORMAT_VERSION} (upgrade coda-gqa-l)"
        )
    return meta, tensors


def load_state(
    path: str | os.PathLike[str],
    *,
    config: BoundedConfig | Sequence[BoundedConfig] | None = None,
    module_config: dict[str, Any] | None = None,
    model_fingerprint: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> BoundedState | list[BoundedState]:
    """Read a state file written by ``save_state`` and check it before returning anything.

    Every ``expected`` value given (``config``, ``module_config``, ``model_fingerprint``,
    ``dtype``) must match what the file records; a mismatch raises ``StateFileError`` naming
    it. Returns one ``BoundedState``, or a list for a file holding several layers.
    """
    path = Path(path)
    meta, tensors = _read(path, with_tensors=True)
    if meta.get("checksum") != _checksum(meta, tensors):
        raise StateFileError(f"{path}: checksum mismatch: the file is corrupt or was modified")
    while meta["format_version"] < FORMAT_VERSION:
        version = meta["format_version"]
        if version not in MIGRATIONS:
            raise StateFileError(f"{path}: no migration from state format version {version}")
        meta, tensors = MIGRATIONS[version](meta, tensors)
        meta["format_version"] = version + 1
    num_layers = meta.get("num_layers")
    raw_configs = meta.get("configs")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MAX_LAYERS:
        raise StateFileError(f"{path}: metadata field 'num_layers' must be an integer from 1 to {MAX_LAYERS}")
    if not isinstance(raw_configs, list) or len(raw_configs) != num_layers:
        raise StateFileError(f"{path}: metadata field 'configs' must list one config per layer ({num_layers})")
    try:
        configs = [BoundedConfig.from_dict(c) for c in raw_configs]
    except (TypeError, ValueError, KeyError) as err:
        raise StateFileError(f"{path}: metadata field 'configs' holds an invalid config: {err}") from err
    _check_layout(path, meta, num_layers)
    if config is not None:
        expected = [config] * num_layers if isinstance(config, BoundedConfig) else list(config)
        if len(expected) != num_layers:
            raise StateFileError(f"{path}: holds {num_layers} layers, expected {len(expected)}")
        for i, (want, have) in enumerate(zip(expected, configs, strict=True)):
            if want != have:
                diff = {k: (v, want.to_dict()[k]) for k, v in have.to_dict().items() if want.to_dict()[k] != v}
                raise StateFileError(
                    f"{path}: layer {i} was saved with another config; (file, expected) differ in {diff}"
                )
    if module_config is not None and meta.get("module_config") != module_config:
        saved: dict[str, Any] = meta.get("module_config") or {}
        keys = set(saved) | set(module_config)
        diff = {k: (saved.get(k), module_config.get(k)) for k in keys if saved.get(k) != module_config.get(k)}
        raise StateFileError(f"{path}: saved for another module; (file, expected) differ in {diff}")
    if model_fingerprint is not None and meta.get("model_fingerprint") != model_fingerprint:
        raise StateFileError(
            f"{path}: saved from another model (fingerprint {str(meta.get('model_fingerprint'))[:12]}..., "
            f"expected {model_fingerprint[:12]}...)"
        )
    dtype_name = meta.get("dtype")
    saved_dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if saved_dtype is None:
        raise StateFileError(f"{path}: unsupported state dtype {meta.get('dtype')!r}")
    if dtype is not None and dtype != saved_dtype:
        raise StateFileError(f"{path}: state was saved in {saved_dtype}, expected {dtype}")
    states = [_assemble(path, meta, tensors, i, configs[i], saved_dtype, device) for i in range(num_layers)]
    return states[0] if meta.get("single") and num_layers == 1 else states


MAX_POSITION = 2**40  # tokens; far beyond any stream, small enough that position arithmetic cannot overflow
MAX_DIM = 1 << 16  # batch rows, KV heads or head size claimed by a file


def _check_layout(path: Path, meta: dict[str, Any], num_layers: int) -> None:
    """Types and ranges of the metadata fields that size tensors or positions, before any is used."""

    def count(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if not count(meta.get("batch_size"), 1, MAX_DIM):
        raise StateFileError(f"{path}: metadata field 'batch_size' must be an integer from 1 to {MAX_DIM}")
    for name, low, high in (("positions", 0, MAX_POSITION), ("num_kv_heads", 1, MAX_DIM), ("head_dim", 1, MAX_DIM)):
        values = meta.get(name)
        if not isinstance(values, list) or len(values) != num_layers or not all(count(v, low, high) for v in values):
            raise StateFileError(
                f"{path}: metadata field {name!r} must list {num_layers} integers from {low} to {high}"
            )
    if not isinstance(meta.get("single"), bool) or not isinstance(meta.get("int8", False), bool):
        raise StateFileError(f"{path}: metadata fields 'single' and 'int8' must be true or false")


def _assemble(
    path: Path,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    layer: int,
    config: BoundedConfig,
    dtype: torch.dtype,
    device: torch.device | str,
) -> BoundedState:
    batch, hkv, head_dim = int(meta["batch_size"]), int(meta["num_kv_heads"][layer]), int(meta["head_dim"][layer])
    template = BoundedState.empty(config, batch, hkv, head_dim, "meta", dtype)
    fields: dict[str, Any] = {}
    for name in TENSOR_FIELDS:
        key = f"layer{layer}.{name}"
        want = getattr(template, name)
        if key in tensors:
            value = tensors[key]
        elif key + ".q8" in tensors and key + ".scale" in tensors:
            q8, scale = tensors[key + ".q8"], tensors[key + ".scale"]
            # shapes first: a crafted scale that broadcasts against q8 would allocate their outer product
            if q8.shape != want.shape or scale.shape != (*want.shape[:-1], 1):
                raise StateFileError(
                    f"{path}: tensors {key + '.q8'!r} {tuple(q8.shape)} and {key + '.scale'!r} {tuple(scale.shape)} "
                    f"do not fit the expected shape {tuple(want.shape)}"
                )
            value = (q8.float() * scale.float()).to(dtype)
        else:
            raise StateFileError(f"{path}: tensor {key!r} is missing")
        if value.shape != want.shape or value.dtype != want.dtype:
            raise StateFileError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                f"expected {tuple(want.shape)} and {want.dtype}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise StateFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
        fields[name] = value.to(device)
    pos = int(meta["positions"][layer])
    if bool((fields["position"] != pos).any()):
        raise StateFileError(f"{path}: layer {layer} position tensor disagrees with its recorded position {pos}")
    return BoundedState(config=config, pos=pos, **fields)
