"""State files (docs/state_files.md) and invariant 6: save, load, continue equals never stopping."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from helpers import make_layer, token_like
from safetensors.torch import save_file

from coda_gqa_l import BoundedConfig, statefile
from coda_gqa_l.statefile import StateFileError, load_state, module_fingerprint, read_state_metadata, save_state


@pytest.fixture()
def layer_and_state():
    layer = make_layer("gqa", "sinks-banks")
    x = token_like(2, 200, 64, 1)
    with torch.no_grad():
        _, state = layer.prefill_chunked(x, layer.init_state(2), block_size=50)
    return layer, state


def test_save_load_continue_is_bit_for_bit(tmp_path: Path) -> None:
    layer = make_layer("gqa", "full")
    x = token_like(2, 320, 64, 3)
    with torch.no_grad():
        straight, never_stopped = layer.prefill_chunked(x, layer.init_state(2), block_size=40)
        state = layer.init_state(2)
        first, state = layer.prefill_chunked(x[:, :200], state, block_size=40)
        save_state(tmp_path / "s.safetensors", state, model_fingerprint=module_fingerprint(layer))
        resumed = load_state(
            tmp_path / "s.safetensors", config=layer.config, model_fingerprint=module_fingerprint(layer)
        )
        second, resumed = layer.prefill_chunked(x[:, 200:], resumed, block_size=40)
    assert never_stopped.metrics["exact_inserts"] > 0
    assert torch.equal(torch.cat([first, second], 1), straight)
    for name, tensor in never_stopped.tensors().items():
        assert torch.equal(getattr(resumed, name), tensor), name
    assert resumed.pos == never_stopped.pos == 320


def test_multi_layer_file_and_metadata(tmp_path: Path, layer_and_state) -> None:
    layer, state = layer_and_state
    path = tmp_path / "model.safetensors"
    save_state(path, [state, state.clone()], module_config={"embed_dim": 64}, extra={"label": "doc"})
    meta = read_state_metadata(path)
    assert meta["num_layers"] == 2 and meta["positions"] == [200, 200] and meta["extra"] == {"label": "doc"}
    assert meta["configs"][0] == layer.config.to_dict() and meta["dtype"] == "torch.float32"
    loaded = load_state(path, module_config={"embed_dim": 64})
    assert isinstance(loaded, list) and len(loaded) == 2
    assert torch.equal(loaded[1].ex_k, state.ex_k)


def test_int8_storage_is_smaller_and_close(tmp_path: Path, layer_and_state) -> None:
    _, state = layer_and_state
    save_state(tmp_path / "f.safetensors", state)
    save_state(tmp_path / "q.safetensors", state, int8=True)
    assert os.path.getsize(tmp_path / "q.safetensors") < 0.5 * os.path.getsize(tmp_path / "f.safetensors")
    loaded = load_state(tmp_path / "q.safetensors")
    assert loaded.dtype == state.dtype
    for name in ("win_k", "ex_v", "sm_k"):
        ref = getattr(state, name)
        rel = (getattr(loaded, name) - ref).norm() / ref.norm()
        assert 0 < rel < 1e-2, name
    assert torch.equal(loaded.ex_last, state.ex_last)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(config=BoundedConfig(window=64, num_landmarks_exact=6, num_landmarks_summary=4, num_sink=3)),
            "another config",
        ),
        (dict(model_fingerprint="0" * 64), "another model"),
        (dict(dtype=torch.bfloat16), "saved in torch.float32"),
        (dict(module_config={"embed_dim": 128}), "another module"),
    ],
)
def test_mismatches_are_refused(tmp_path: Path, layer_and_state, kwargs, message: str) -> None:
    _, state = layer_and_state
    save_state(tmp_path / "s.safetensors", state, model_fingerprint="f" * 64, module_config={"embed_dim": 64})
    with pytest.raises(StateFileError, match=message):
        load_state(tmp_path / "s.safetensors", **kwargs)


def _corrupt_cases(path: Path) -> dict[str, bytes]:
    good = path.read_bytes()
    header_len = int.from_bytes(good[:8], "little")
    flipped = bytearray(good)
    flipped[8 + header_len + 100] ^= 0x10  # one bit inside the tensor data
    meta_flip = bytearray(good)
    at = good.index(b'"positions')
    meta_flip[at + 15 : at + 16] = b"9" if good[at + 15 : at + 16] != b"9" else b"8"
    return {
        "truncated": good[: len(good) // 2],
        "bit flip in tensor data": bytes(flipped),
        "edited metadata": bytes(meta_flip),
        "empty": b"",
        "random bytes": os.urandom(4096),
    }


@pytest.mark.parametrize("case", ["truncated", "bit flip in tensor data", "edited metadata", "empty", "random bytes"])
def test_corrupt_files_are_refused(tmp_path: Path, layer_and_state, case: str) -> None:
    _, state = layer_and_state
    path = tmp_path / "s.safetensors"
    save_state(path, state)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_corrupt_cases(path)[case])
    with pytest.raises(StateFileError):
        load_state(bad)


class _Tripwire:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TRIPWIRE"]),))


def test_pickles_and_foreign_files_are_never_executed(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("TRIPWIRE", str(marker))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state": _Tripwire()}))
    with pytest.raises(StateFileError, match="not a readable state file"):
        load_state(evil)
    assert not marker.exists()
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(StateFileError, match="not a CoDA-GQA-L state"):
        load_state(foreign)
    with pytest.raises(StateFileError, match="no such state file"):
        load_state(tmp_path / "missing.safetensors")


def test_newer_format_is_refused_and_older_is_migrated(tmp_path: Path, layer_and_state, monkeypatch) -> None:
    _, state = layer_and_state
    path = tmp_path / "s.safetensors"
    monkeypatch.setattr(statefile, "FORMAT_VERSION", 7)
    save_state(path, state)
    monkeypatch.setattr(statefile, "FORMAT_VERSION", 6)
    with pytest.raises(StateFileError, match="version 7"):
        load_state(path)
    # a file of version 7 read by a package at version 8 goes through the registered migration
    monkeypatch.setattr(statefile, "FORMAT_VERSION", 8)
    with pytest.raises(StateFileError, match="no migration"):
        load_state(path)
    seen = []

    def migrate(meta, tensors):
        seen.append(meta["format_version"])
        return meta, tensors

    monkeypatch.setitem(statefile.MIGRATIONS, 7, migrate)
    loaded = load_state(path)
    assert seen == [7] and torch.equal(loaded.ex_k, state.ex_k)


def test_failed_save_keeps_the_old_file(tmp_path: Path, layer_and_state, monkeypatch) -> None:
    layer, state = layer_and_state
    path = tmp_path / "s.safetensors"
    save_state(path, state)
    before = path.read_bytes()
    with torch.no_grad():
        layer.prefill_chunked(torch.randn(2, 50, 64), state)

    def crash(fd: int) -> None:
        raise OSError("disk died mid-save")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        save_state(path, state)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_state(path).pos == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]  # no temp file left


def _crafted(path: Path, out: Path, edit_meta=None, edit_tensors=None) -> Path:
    """A copy of a state file with metadata or tensors changed and the checksum recomputed."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[statefile.METADATA_KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    meta["checksum"] = statefile._checksum(meta, tensors)
    save_file(tensors, str(out), metadata={statefile.METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return out


def _refused_in_a_subprocess(path: Path, tmp_path: Path) -> tuple[float, float, str]:
    """Load ``path`` in a child process; (seconds, memory growth in MiB, error type and message)."""
    import json
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import json, resource, sys, time
        from coda_gqa_l.statefile import load_state
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            load_state({str(path)!r})
            outcome = "loaded"
        except Exception as err:
            outcome = type(err).__name__ + ": " + str(err)
        took = time.perf_counter() - start
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps([took, grew, outcome]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    took, grew, outcome = json.loads(done.stdout.strip().splitlines()[-1])
    return took, grew, outcome


@pytest.mark.parametrize("case", ["broadcast-scale", "a-billion-layers"])
def test_small_crafted_files_allocate_nothing_large(tmp_path: Path, layer_and_state, case: str) -> None:
    layer, state = layer_and_state
    save_state(tmp_path / "s.state", state, int8=case == "broadcast-scale")
    if case == "broadcast-scale":  # q8 (n, 1, 1, 1) against scale (1, n, 1, 1): an n x n product if not checked

        def edit(tensors: dict) -> None:
            n = 8000
            tensors["layer0.win_k.q8"] = torch.zeros(n, 1, 1, 1, dtype=torch.int8)
            tensors["layer0.win_k.scale"] = torch.ones(1, n, 1, 1)

        crafted = _crafted(tmp_path / "s.state", tmp_path / "c.state", edit_tensors=edit)
        field = "win_k"
    else:
        crafted = _crafted(tmp_path / "s.state", tmp_path / "c.state", edit_meta=lambda m: m.update(num_layers=10**9))
        field = "num_layers"
    took, grew, outcome = _refused_in_a_subprocess(crafted, tmp_path)
    assert outcome.startswith("StateFileError: ") and field in outcome, outcome
    assert took < 2.0 and grew < 64, (took, grew)


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("nan", "holds NaN"),
        ("negative-position", "positions"),
        ("text-batch", "batch_size"),
        ("configs-not-a-list", "configs"),
        ("single-as-text", "single"),
        ("differential-as-text", "differential"),
    ],
)
def test_crafted_content_is_refused_by_field(tmp_path: Path, layer_and_state, case: str, field: str) -> None:
    _, state = layer_and_state
    save_state(tmp_path / "s.state", state)
    edits = {
        "negative-position": lambda m: m.update(positions=[-3]),
        "text-batch": lambda m: m.update(batch_size="2"),
        "configs-not-a-list": lambda m: m.update(configs={"window": 1}),
        "single-as-text": lambda m: m.update(single="yes"),
        "differential-as-text": lambda m: m["configs"][0].update(differential="no"),
    }

    def poison(tensors: dict) -> None:
        tensors["layer0.win_v"][0, 0, 0, 0] = float("nan")

    crafted = _crafted(tmp_path / "s.state", tmp_path / "c.state", edit_meta=edits.get(case),
                       edit_tensors=poison if case == "nan" else None)  # fmt: skip
    with pytest.raises(StateFileError) as info:
        load_state(crafted)
    assert type(info.value) is StateFileError and field in str(info.value)
