"""Weights files: the weight-space mean of two runs (``average_weights_files``, scripts/average_weights.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coda_gqa_l.models.pretrained import SHIPPED_WEIGHTS
from coda_gqa_l.models.weights import WeightsFileError, average_weights_files, read_coda_weights


def _variant(path: Path, shift: float, **meta_changes) -> Path:
    """The shipped file with every tensor moved by ``shift`` and a training record of its own."""
    tensors, meta = read_coda_weights(SHIPPED_WEIGHTS)
    moved = {name: (t.float() + shift).to(t.dtype) for name, t in tensors.items()}
    meta = {**meta, "training": {"run": f"shift {shift}"}, **meta_changes}
    save_file(moved, str(path), metadata={"coda_gqa_l": json.dumps(meta)})
    return path


def test_the_mean_weighs_each_tensor_and_keeps_both_histories(tmp_path: Path) -> None:
    first, second = _variant(tmp_path / "a.safetensors", 0.0), _variant(tmp_path / "b.safetensors", 1.0)
    out = average_weights_files(first, second, tmp_path / "mean.safetensors", share_first=0.25)
    mean, meta = read_coda_weights(out)
    (a, _), (b, second_meta) = read_coda_weights(first), read_coda_weights(second)
    for name in a:
        expected = (0.25 * a[name].float() + 0.75 * b[name].float()).to(a[name].dtype)
        assert mean[name].dtype == a[name].dtype
        torch.testing.assert_close(mean[name], expected, rtol=0, atol=0)
    assert meta["convert"] == second_meta["convert"] and meta["lora"] == second_meta["lora"]
    sources = meta["training"]["averaged_from"]
    assert [s["file"] for s in sources] == ["a.safetensors", "b.safetensors"]
    assert [s["share"] for s in sources] == [0.25, 0.75]
    assert sources[1]["training"] == {"run": "shift 1.0"}


def test_files_of_other_configurations_or_a_bad_share_are_refused(tmp_path: Path) -> None:
    first = _variant(tmp_path / "a.safetensors", 0.0)
    other_lora = _variant(tmp_path / "b.safetensors", 1.0, lora={"rank": 16, "alpha": 32.0})
    with pytest.raises(WeightsFileError, match="differ in 'lora'"):
        average_weights_files(first, other_lora, tmp_path / "mean.safetensors")
    with pytest.raises(WeightsFileError, match="between 0 and 1"):
        average_weights_files(first, first, tmp_path / "mean.safetensors", share_first=1.5)
    assert not (tmp_path / "mean.safetensors").exists()


def test_the_shipped_weights_label_names_the_file_the_version_and_its_digest() -> None:
    """What a refused store's message names (neuraldb.engine): it changes whenever the shipped file does."""
    import hashlib

    from coda_gqa_l import __version__
    from coda_gqa_l.models.pretrained import shipped_weights_label

    digest = hashlib.sha256(SHIPPED_WEIGHTS.read_bytes()).hexdigest()[:12]
    expected = f"smollm2-135m-instruct-coda.safetensors of coda-gqa-l {__version__} sha256:{digest}"
    assert shipped_weights_label() == expected
