"""``NeuralDatabase``: ingest a document once into a fixed-size state, ask questions later.

A store is a folder: ``index.sqlite`` (one row per document: label, source hash, model
fingerprint, config, tokens, created, sizes) and ``states/`` (one state file per document,
docs/state_files.md). Ingest streams the document through the bounded model in chunks (memory stays flat
whatever its length) and saves the state of every layer. Ask loads the state into a fresh
cache, prefills the question and generates the answer, streamed; the stored state never
changes, so questions asked at the same time on one document do not interfere. A session
keeps a follow-up conversation in its own fork of the state.

Prompts follow the model's chat format when it has one (ChatML for SmolLM2): the document
opens a user turn, the question closes it, and the assistant answers.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BoundedConfig
from ..data.prompts import PromptFormat, encode_prompt
from ..kernels import dispatch
from ..models.cache import BoundedCache, bounded_modules
from ..models.convert import convert
from ..models.generation import DecodeSteps, StepAhead, decode_steps, pick_token
from ..models.graph_prefill import prefill
from ..models.hf_compat import cache_kwargs
from ..models.inference import fold_for_inference
from ..models.loader import load_smollm2
from ..models.pretrained import load_coda_smollm2, shipped_config, shipped_weights_label
from ..models.tiny import tiny_llama
from ..models.tokenizer import ByteTokenizer
from ..statefile import StateFileError, module_fingerprint, read_state_metadata
from .errors import DocumentNotFound as DocumentNotFound  # re-exported: callers import it from here
from .errors import IngestCancelled, NeuralDBError
from .interrupts import stop_if_asked
from .limits import MAX_LABEL, MAX_QUESTION_CHARS, MAX_TEMPERATURE
from .store import DocumentInfo, DocumentStore

# The shipped weights' config, as their file states it (one place): medium with 4 sinks, routed with the
# thresholds measured for those weights (benchmarks/results/retrieval.md and facts.md)
DEFAULT_CONFIG = shipped_config()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Tokens an ingest reads per forward. On CUDA, chunks of 4,096 (two a graph replay) ingest SmolLM2 1.43x / 1.38x
# faster than chunks of 1,024 at 32K / 128K tokens, at the same peak memory (284 / 285 MiB; H100, benchmarks/RESULTS.md,
# twenty-fifth session); the CPU keeps the chunk its ingest was measured with.
CUDA_CHUNK_TOKENS = 4096
CPU_CHUNK_TOKENS = 1024


class NeuralDatabase:
    """A store of documents, each kept as the fixed-size state a bounded model left after reading it.

    Args:
        folder: the store (created if missing).
        model: a causal LM converted with ``coda_gqa_l.convert(model, config)``; ``None`` loads
            the packaged SmolLM2-135M-Instruct (``default_model``).
        tokenizer: the model's tokenizer (anything with ``encode``/``decode``/``eos_token_id``).
        chunk_tokens: tokens per forward pass while ingesting (memory, not results); ``None``: ``CUDA_CHUNK_TOKENS``
            on CUDA, ``CPU_CHUNK_TOKENS`` elsewhere.
        weights: a name for the model's trained weights, recorded with each state.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None`` leaves it where it is). The
            weights keep their dtype, so states move between a CPU and a GPU database of one model. On CUDA
            answers decode through the whole model's CUDA graphs (``models.graph_decode``), and the attention
            kernels multiply float32 tiles in three TF32 products for the whole process
            (``kernels.dispatch.set_float32_dots("tf32x3")``; ``CODA_GQA_L_FP32_DOTS`` overrides it).
    """

    def __init__(
        self,
        folder: str | Path,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        *,
        chunk_tokens: int | None = None,
        weights: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        target = check_device(device) if device is not None else None
        owned = model is None  # the database's own model: it may fold its adapters for speed (below)
        if model is None:
            model, tokenizer = default_model(merge_adapters=False)
            weights = weights or shipped_weights_label()
        if tokenizer is None:
            raise NeuralDBError("a model needs its tokenizer")
        if target is not None:
            model = model.to(target)
        on_cuda = any(p.is_cuda for p in model.parameters())  # moved here, or given there
        if on_cuda and not dispatch.float32_dots_forced():
            # float32 attention tiles in three TF32 products (near float32's error): the exact float32 path's
            # forward takes about 20 s to compile, which a fresh process's first ingest would wait for
            dispatch.set_float32_dots("tf32x3")
        self.store = DocumentStore(folder)
        self.folder, self.states_dir, self.index = self.store.folder, self.store.states_dir, self.store.index
        self.model = model.eval()
        self.tokenizer = tokenizer
        if chunk_tokens is None:
            chunk_tokens = CUDA_CHUNK_TOKENS if on_cuda else CPU_CHUNK_TOKENS
        self.chunk_tokens = chunk_tokens
        self.weights = weights  # a name for the trained weights, recorded with each state (None: not known)
        modules = bounded_modules(model)
        self.config = modules[0].config.to_dict()
        self.layers = len(modules)
        self._per_token_bytes = sum(m.full_cache_bytes(1) for m in modules)
        self.fingerprint = module_fingerprint(model)  # once: it hashes every weight
        if owned:
            # after the fingerprint, which stays that of the weights as trained (states saved before still load);
            # a caller's model is left as given (it may go on training its adapters)
            fold_for_inference(model)
        self.format = PromptFormat.for_tokenizer(tokenizer)
        self._stop_ids = self._stop_token_ids()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def tiny_for_tests(cls, folder: str | Path, device: str | torch.device | None = None) -> NeuralDatabase:
        """A tiny random Llama with a byte tokenizer: fast and deterministic, answers are noise."""
        model, _ = tiny_llama(seed=0, max_position_embeddings=4096)
        bounded = BoundedConfig(window=32, num_landmarks_exact=8, num_landmarks_summary=8, num_sink=2)
        return cls(folder, convert(model, bounded), ByteTokenizer(), chunk_tokens=256, device=device)

    def _encode(self, parts: list[tuple[str, bool]]) -> torch.Tensor:
        """``(text, from_user)`` parts as one row of ids: the user's text never yields a control token
        (``encode_prompt``). verbose=False: a document longer than the model's training length is the point here,
        not a mistake (the tokenizer would warn that running it "will result in indexing errors")."""
        return torch.tensor([encode_prompt(self.tokenizer, parts)], dtype=torch.long, device=self._device)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _stop_token_ids(self) -> set[int]:
        stops = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()
        for text in self.format.stop_strings:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                stops.add(int(ids[0]))
        return stops

    # ------------------------------------------------------------------ ingest
    def ingest(
        self,
        text: str,
        *,
        label: str | None = None,
        progress: bool = False,
        should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> DocumentInfo:
        """Read ``text`` once and store the state it leaves; a source already stored for this
        model and config is not read again (its info comes back with ``duplicate=True``).

        ``should_stop``: asked before the read and after every chunk; once it says True the ingest
        raises ``IngestCancelled`` and stores nothing (the HTTP service stops when its client goes away).
        ``on_progress(read, total)``: called with the tokens read so far and the document's tokens, before the
        read (0) and after every chunk (the HTTP service streams it to the page)."""
        if not isinstance(text, str) or not text.strip():
            raise NeuralDBError("the document is empty")
        label = check_label(label if label is not None else _default_label(text))
        source = _sha256_text(text)
        existing = self.index.find_source(source, self.fingerprint, self.config)
        if existing is not None:
            existing.duplicate = True
            return existing
        ids = self._encode([(self.format.document_prefix, False), (text, True)])

        def stop_if_cancelled() -> None:
            if should_stop is not None and should_stop():
                raise IngestCancelled(f"the ingest of {label!r} was cancelled; nothing was stored")

        stop_if_cancelled()
        total, done = int(ids.shape[1]), 0
        if on_progress is not None:
            on_progress(0, total)
        cache = BoundedCache(self.model, block_size=self.chunk_tokens)
        base = getattr(self.model, "model", self.model)  # skip the LM head: no vocabulary-sized outputs
        from tqdm import tqdm

        with (
            torch.inference_mode(),
            tqdm(total=ids.shape[1], unit="tok", desc=f"ingest {label or 'document'}", disable=not progress) as bar,
        ):

            def read(piece: torch.Tensor) -> None:
                base(input_ids=piece, **cache_kwargs(cache), use_cache=True)

            # whole chunks replay the model's CUDA graphs where they run (models/graph_prefill.py)
            def read_more(tokens: int) -> None:
                nonlocal done
                bar.update(tokens)
                done += tokens
                if on_progress is not None:
                    on_progress(done, total)
                stop_if_asked()  # a Ctrl-C that Python dropped in a finalizer (neuraldb/interrupts.py)
                stop_if_cancelled()

            prefill(self.model, cache, ids, chunk_tokens=self.chunk_tokens, forward=read, on_chunk=read_more)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path = self.store.new_state_path()
        extra = {"label": label, "source_sha256": source, "tokens": int(ids.shape[1]), "created": created}
        if self.weights:
            extra["weights"] = self.weights
        cache.save(path, model_fingerprint=self.fingerprint, extra=extra)
        return self._insert(path, cache, label=label, source=source, tokens=int(ids.shape[1]), created=created)

    def _insert(
        self, path: Path, cache: BoundedCache, *, label: str, source: str, tokens: int, created: str
    ) -> DocumentInfo:
        """Index the state file at ``path`` (already in the store) as a new document; when another
        process stored the same source meanwhile, drop our copy and return theirs."""
        info = DocumentInfo(
            id=0,
            label=label,
            source_sha256=source,
            model_fingerprint=self.fingerprint,
            config=self.config,
            tokens=tokens,
            created=created,
            state_bytes=cache.nbytes(),
            file_bytes=path.stat().st_size,
            full_cache_bytes=self._per_token_bytes * tokens,
            state_file=path.name,
        )
        try:
            return self.index.insert(info)
        except sqlite3.IntegrityError:  # another process stored the same source meanwhile
            existing = self.index.find_source(info.source_sha256, self.fingerprint, self.config)
            if existing is None:
                raise
            (self.states_dir / info.state_file).unlink(missing_ok=True)  # our copy is not needed
            existing.duplicate = True
            return existing

    def ingest_file(self, path: str | Path, *, label: str | None = None, progress: bool = False) -> DocumentInfo:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text (the upload drops it too)
        except FileNotFoundError as err:
            raise NeuralDBError(f"{path}: no such file") from err
        except UnicodeDecodeError as err:
            raise NeuralDBError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except OSError as err:  # a folder, no permission, ...
            raise NeuralDBError(f"{path}: cannot read it ({err.strerror or err})") from err
        try:
            return self.ingest(text, label=label or path.name, progress=progress)
        except NeuralDBError as err:  # which file, when several are read
            raise NeuralDBError(f"{path}: {err}") from err

    def ingest_folder(self, folder: str | Path, pattern: str = "*.txt", progress: bool = False) -> list[DocumentInfo]:
        return [self.ingest_file(path, progress=progress) for path in folder_files(folder, pattern)]

    # ------------------------------------------------------------------ read
    def list(self) -> list[DocumentInfo]:
        return self.store.list()

    def show(self, ref: int | str) -> DocumentInfo:
        return self.store.show(ref)

    def _load(self, info: DocumentInfo) -> Any:
        if info.model_fingerprint != self.fingerprint or info.config != self.config:
            made_by = self._weights_of(info)
            what = (
                f"other weights ({made_by})"
                if made_by and info.config == self.config
                else "another model or config, or weights older than coda-gqa-l 0.2.0 (which did not record their name)"
            )
            uses = f"{self.weights}, " if self.weights else ""
            raise NeuralDBError(
                f"document {info.id} ({info.label!r}) was ingested with {what} (fingerprint "
                f"{info.model_fingerprint[:12]}..., this database uses {uses}fingerprint {self.fingerprint[:12]}...): "
                f"a state only works with the model that made it; re-ingest the document to ask it with this one"
            )
        try:
            return BoundedCache.load(self.states_dir / info.state_file, self.model, model_fingerprint=self.fingerprint)
        except StateFileError as err:
            raise NeuralDBError(f"document {info.id} ({info.label!r}): {err}") from err

    def _weights_of(self, info: DocumentInfo) -> str | None:
        """The weights a stored state names in its metadata; states from before weights were recorded say so."""
        try:
            extra = read_state_metadata(self.states_dir / info.state_file).get("extra") or {}
        except (StateFileError, OSError):
            return None
        weights = extra.get("weights")
        return str(weights) if isinstance(weights, str) and weights else None

    def ask_stream(
        self, ref: int | str, question: str, *, max_new_tokens: int = 96, temperature: float = 0.0
    ) -> Iterator[str]:
        """The answer to ``question`` about document ``ref``, in pieces as they are generated."""
        return self.session(ref).ask_stream(question, max_new_tokens=max_new_tokens, temperature=temperature)

    def ask(self, ref: int | str, question: str, *, max_new_tokens: int = 96, temperature: float = 0.0) -> str:
        return "".join(self.ask_stream(ref, question, max_new_tokens=max_new_tokens, temperature=temperature))

    def session(self, ref: int | str) -> Session:
        """A conversation about document ``ref`` on a fork of its stored state."""
        info = self.show(ref)
        return Session(self, info, self._load(info))

    # ------------------------------------------------------------------ manage
    def delete(self, ref: int | str) -> None:
        self.store.delete(ref)

    def export(self, ref: int | str, dest: str | Path, *, overwrite: bool = False, mode: int | None = None) -> Path:
        """Copy document ``ref``'s state file to ``dest`` (atomically; ``DocumentStore.export``)."""
        return self.store.export(ref, dest, overwrite=overwrite, mode=mode)

    def import_state(self, path: str | Path, *, label: str | None = None) -> DocumentInfo:
        """Add a state file exported from a database with the same model and config.

        Every metadata field the store uses is checked before anything is copied, and the copy gets
        a name the store makes itself: nothing in the file decides where it is written."""
        path = Path(path)
        try:
            meta = read_state_metadata(path)
            source, tokens, saved_label, created = _exported_fields(path, meta)
            cache = BoundedCache.load(path, self.model, model_fingerprint=self.fingerprint)
        except StateFileError as err:
            raise NeuralDBError(str(err)) from err
        if label is None:  # an older store may have exported a label that reads as an id
            label = saved_label or path.stem
            label = f"document {label}" if label.strip().isdigit() else label
        label = check_label(label)
        existing = self.index.find_source(source, self.fingerprint, self.config)
        if existing is not None:
            existing.duplicate = True
            return existing
        dest = self.store.new_state_path()
        shutil.copyfile(path, dest)
        return self._insert(
            dest, cache, label=label, source=source, tokens=tokens, created=created or str(meta.get("created"))
        )


_SHA256 = re.compile(r"[0-9a-f]{64}")


def folder_files(folder: str | Path, pattern: str = "*.txt") -> list[Path]:
    """The files of ``folder`` whose names match ``pattern``, sorted; a ``NeuralDBError`` when there are none."""
    files = sorted(path for path in Path(folder).glob(pattern) if path.is_file())
    if not files:
        raise NeuralDBError(f"{folder}: no files match {pattern!r}")
    return files


def _default_label(text: str) -> str:
    """The label of a document given none: its first line, at most 60 characters (one of digits only, which would
    read as an id, prefixed with 'document')."""
    first = " ".join(text.strip().split("\n", 1)[0].split())[:60] or "document"
    return f"document {first}" if first.isdigit() else first


def check_label(label: str) -> str:
    """A label as the store keeps it: text of at most ``MAX_LABEL`` characters, no control characters, not digits
    only (``coda-db ask 7`` means document #7)."""
    if not isinstance(label, str) or not label.strip():
        raise NeuralDBError("a label must be non-empty text")
    if label.strip().isdigit():
        raise NeuralDBError(f"a label of digits only ({label.strip()!r}) would read as a document id; add a letter")
    if len(label) > MAX_LABEL:
        raise NeuralDBError(f"a label has at most {MAX_LABEL} characters, got {len(label)}")
    if any(ord(c) < 32 for c in label) or any(0xD800 <= ord(c) <= 0xDFFF for c in label):
        raise NeuralDBError("a label may not hold control characters or lone surrogates")
    return label


def _exported_fields(path: Path, meta: dict[str, Any]) -> tuple[str, int, str | None, str | None]:
    """``(source_sha256, tokens, label, created)`` of an exported state, each checked for type and range."""
    extra = meta.get("extra")
    if not isinstance(extra, dict):
        raise StateFileError(f"{path}: metadata field 'extra' is not an object")
    source = extra.get("source_sha256")
    if not isinstance(source, str) or not _SHA256.fullmatch(source):
        raise StateFileError(
            f"{path}: metadata field 'extra.source_sha256' must be 64 lower-case hex digits "
            "(a state file, but not one exported from a neural database?)"
        )
    tokens = extra.get("tokens")
    positions = meta.get("positions")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens < 2**40:
        raise StateFileError(f"{path}: metadata field 'extra.tokens' must be a positive integer, got {tokens!r:.40}")
    if isinstance(positions, list) and positions and positions[0] != tokens:
        raise StateFileError(f"{path}: metadata field 'extra.tokens' ({tokens}) disagrees with the state's position")
    label, created = extra.get("label"), extra.get("created")
    if label is not None and not isinstance(label, str):
        raise StateFileError(f"{path}: metadata field 'extra.label' must be text")
    if created is not None and (not isinstance(created, str) or len(created) > 64):
        raise StateFileError(f"{path}: metadata field 'extra.created' must be a short text")
    return source, tokens, label, created


class Session:
    """Follow-up questions on one document; the conversation lives in this fork only."""

    def __init__(self, db: NeuralDatabase, info: DocumentInfo, cache: Any) -> None:
        self.db, self.info, self.cache = db, info, cache
        self.turns = 0

    def ask(self, question: str, *, max_new_tokens: int = 96, temperature: float = 0.0) -> str:
        return "".join(self.ask_stream(question, max_new_tokens=max_new_tokens, temperature=temperature))

    def ask_stream(self, question: str, *, max_new_tokens: int = 96, temperature: float = 0.0) -> Iterator[str]:
        if not isinstance(question, str) or not question.strip():
            raise NeuralDBError("the question is empty")
        if len(question) > MAX_QUESTION_CHARS:
            raise NeuralDBError(f"a question has at most {MAX_QUESTION_CHARS:,} characters, got {len(question):,}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise NeuralDBError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise NeuralDBError(
                f"temperature must be a number from 0 (greedy) to {MAX_TEMPERATURE:g}, got {temperature!r}"
            )
        template = self.db.format.question if self.turns == 0 else self.db.format.follow_up
        self.turns += 1
        before, after = template.split("{question}")
        return self._generate([(before, False), (question.strip(), True), (after, False)], max_new_tokens, temperature)

    def _generate(self, prompt: list[tuple[str, bool]], max_new_tokens: int, temperature: float) -> Iterator[str]:
        db = self.db
        generator = torch.Generator(device=db._device).manual_seed(0)
        # the question and each answer token through the whole model's CUDA graphs where they run (one decoder lent
        # for both), else the forward: a short question after the document by decode steps (graph_prefill.prefill)
        with decode_steps(db.model, self.cache) as steps:
            logits = steps.read(db._encode(prompt), db.chunk_tokens)
            yield from self._answer(logits, steps, generator, max_new_tokens, temperature)

    def _answer(
        self,
        logits: torch.Tensor,
        steps: DecodeSteps,
        generator: torch.Generator,
        max_new_tokens: int,
        temperature: float,
    ) -> Iterator[str]:
        db = self.db
        produced: list[int] = []
        shown = ""
        step: StepAhead | None = None  # a step launched ahead whose token the answer has not yet kept
        try:
            for _ in range(max_new_tokens):
                picked = pick_token(logits.float(), temperature, generator)
                on_host = steps.read_later(picked)
                # the next step runs on the GPU while the host reads the token and decides whether the answer goes on
                step = steps.ahead(picked)
                token = int(on_host()[0])
                if token in db._stop_ids:
                    break
                produced.append(token)
                text = db.tokenizer.decode(produced, skip_special_tokens=True)
                line_end = _first_line_end(text)
                if line_end is not None:  # an answer is one line: it stops where its first non-empty line ends
                    if line_end > len(shown):
                        yield text[len(shown) : line_end]
                    break
                # wait for the rest of a multi-byte character before showing it
                if not text.endswith("\ufffd") and len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text
                logits, step = step.logits, None
        finally:
            # the answer stopped at this token (or its reader went away at a yield): the session's state is what it
            # would be had the step never been launched
            if step is not None:
                step.take_back()


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device the model can run on, or a ``NeuralDBError`` that says why not."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise NeuralDBError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise NeuralDBError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU here")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise NeuralDBError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif target.type != "cpu":
        raise NeuralDBError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    return target


def _first_line_end(text: str) -> int | None:
    """Where the first non-empty line of ``text`` ends, or None while it has not ended."""
    start = len(text) - len(text.lstrip())
    end = text.find("\n", start)
    return None if end < 0 else end


def default_model(config: BoundedConfig = DEFAULT_CONFIG, merge_adapters: bool = True) -> tuple[nn.Module, Any]:
    """The embedded default: SmolLM2-135M-Instruct from its package with the shipped trained CoDA
    weights (``pretrained``; ``merge_adapters`` folds their LoRA into the projections); another ``config`` than
    theirs gets an untrained conversion."""
    if config == DEFAULT_CONFIG:  # read from the weights file once, at import
        return load_coda_smollm2(merge_adapters=merge_adapters)
    model, tokenizer = load_smollm2()
    return convert(model, config), tokenizer
