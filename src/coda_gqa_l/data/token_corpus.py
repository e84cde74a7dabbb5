"""Tokenized corpora for from-scratch training, cached as safetensors so a GPU run needs no tokenizer.

Training text is the packaged Wikipedia train split (plus, by default, the King James Bible);
validation is the Wikipedia held-out split, never trained on; the essays are the passkey
haystack of evaluation (never trained on either). The cache file holds the three id streams
(int32) and, in its metadata, the tokenizer, the vocabulary size and the validation text's UTF-8
bytes per token, which turns a loss in nats per token into bits per byte.

    corpus = load_token_corpus("smollm2")   # built once, then read from <cache>/tokens/
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import fetch
from ..models import loader
from ..models.tokenizer import ByteTokenizer
from . import corpora as texts
from .tokens import token_stream

log = logging.getLogger(__name__)

TOKENIZERS = ("smollm2", "bytes")
TRAIN_CORPORA = ("wikipedia", "bible")
FORMAT = "coda-gqa-l/token-corpus"
VERSION = 2  # 2: the essays' tokens (passkey haystack)


class TokenCorpusError(ValueError):
    """A token cache file that is corrupt or was built another way."""


@dataclass(frozen=True)
class TokenCorpus:
    train: Tensor  # (N,) int32
    val: Tensor  # (M,) int32
    hay: Tensor  # (K,) int32: the essays, haystack of the passkey evaluation
    tokenizer: str
    vocab_size: int
    val_bytes_per_token: float

    def bits_per_byte(self, nats_per_token: float) -> float:
        return nats_per_token / math.log(2) / self.val_bytes_per_token


def token_cache_path(tokenizer: str, corpora: tuple[str, ...], cache_dir: str | os.PathLike[str] | None) -> Path:
    return _tokens_root(cache_dir) / f"{tokenizer}-{'+'.join(corpora)}.safetensors"


def tokenizer_folder(tokenizer: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where a copy of a tokenizer is kept beside the token caches."""
    return _tokens_root(cache_dir) / f"{tokenizer}-tokenizer"


def _tokens_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else fetch.cache_dir()) / "tokens"


def load_token_corpus(
    tokenizer: str = "smollm2",
    corpora: tuple[str, ...] = TRAIN_CORPORA,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TokenCorpus:
    """The tokenized training and validation streams, from the cache or built and cached."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    unknown = sorted(set(corpora) - set(TRAIN_CORPORA))
    if unknown or not corpora:
        raise ValueError(f"training corpora must be among {TRAIN_CORPORA}, got {list(corpora)}")
    path = token_cache_path(tokenizer, corpora, cache_dir)
    if path.exists():
        try:
            return read_token_corpus(path, tokenizer)
        except TokenCorpusError as err:  # a cache of ours: rebuilt, as the corpora caches are
            log.warning("%s; rebuilding it", err)
    corpus = build_token_corpus(tokenizer, corpora, cache_dir)
    write_token_corpus(corpus, path)
    return corpus


def build_token_corpus(
    tokenizer: str, corpora: tuple[str, ...], cache_dir: str | os.PathLike[str] | None = None
) -> TokenCorpus:
    encoder = load_tokenizer(tokenizer, cache_dir)
    train_texts = [d.text for d in texts.load_wikipedia("train", cache_dir)] if "wikipedia" in corpora else []
    if "bible" in corpora:
        train_texts.append(texts.bible_text(cache_dir))
    val_texts = [d.text for d in texts.load_wikipedia("heldout", cache_dir)]
    val = token_stream(val_texts, encoder)
    hay = token_stream([d.text for d in texts.load_essays("all", cache_dir)], encoder)
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    return TokenCorpus(
        train=torch.tensor(token_stream(train_texts, encoder), dtype=torch.int32),
        val=torch.tensor(val, dtype=torch.int32),
        hay=torch.tensor(hay, dtype=torch.int32),
        tokenizer=tokenizer,
        vocab_size=int(len(encoder)) if hasattr(encoder, "__len__") else int(encoder.vocab_size),
        val_bytes_per_token=val_bytes / len(val),
    )


def load_tokenizer(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The byte tokenizer, or SmolLM2's: from ``<cache>/tokens/smollm2-tokenizer`` (a copy kept
    beside the token caches, so a machine without the model can carry both), else from the model."""
    if name == "bytes":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    folder = tokenizer_folder(name, cache_dir)
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer = loader.load_smollm2_tokenizer(cache_dir)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_token_corpus(corpus: TokenCorpus, path: Path) -> None:
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": corpus.tokenizer,
        "vocab_size": corpus.vocab_size,
        "val_bytes_per_token": corpus.val_bytes_per_token,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # clones: safetensors refuses views of one buffer (e.g. streams sliced from one tensor)
    tensors = {"train": corpus.train.clone(), "val": corpus.val.clone(), "hay": corpus.hay.clone()}
    save_file(tensors, str(partial), metadata={"coda_gqa_l": json.dumps(meta)})
    os.replace(partial, path)


def read_token_corpus(path: Path, tokenizer: str) -> TokenCorpus:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("coda_gqa_l", "{}"))
            streams = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise TokenCorpusError(f"{path} is not a readable token cache ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION or meta.get("tokenizer") != tokenizer:
        found = f"{meta.get('tokenizer')!r} tokens in format {meta.get('format')!r} v{meta.get('version')}"
        raise TokenCorpusError(f"{path} holds {found}; expected {tokenizer!r} {FORMAT!r} v{VERSION}")
    if set(streams) != {"train", "val", "hay"}:
        raise TokenCorpusError(f"{path} holds streams {sorted(streams)}, expected train, val and hay")
    if any(int(t.max()) >= meta["vocab_size"] for t in streams.values()):
        raise TokenCorpusError(f"{path}: a token id is beyond the vocabulary ({meta['vocab_size']})")
    vocab, per_token = int(meta["vocab_size"]), float(meta["val_bytes_per_token"])
    return TokenCorpus(streams["train"], streams["val"], streams["hay"], tokenizer, vocab, per_token)
