"""Generation with the bounded state and the fastest decode path there is.

Two ways in, one decode path (prompt prefilled through the forward in chunks, so memory stays flat in the prompt's
length; then one token at a time through the whole model's CUDA graphs, ``graph_decode.GraphModelDecoder``, where
``kernels.dispatch.graph_decode`` allows it, else through the forward; the tokens are the same either way, up to float
rounding):

- ``model.generate(ids, cache=BoundedCache(model), custom_generate=bounded_decoding, ...)``: transformers' own
  ``generate()`` (logits processors, sampling settings, stopping criteria and stop strings) with our loop behind it.
  Without ``custom_generate`` transformers runs the model's forward for every new token: correct, slower.
- ``bounded_generate(model, ids, max_new_tokens)``: prompt in, tokens out, no generation config.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import dispatch
from .cache import BoundedCache
from .graph_decode import (
    GraphCaptureError,
    GraphDecodeError,
    GraphModelDecoder,
    graph_decode_supported,
    shared_decoder_pool,
)
from .graph_prefill import prefill
from .hf_compat import CACHE_ARGUMENTS, cache_argument, cache_kwargs, generate_output_cache


def bounded_generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    cache: BoundedCache | None = None,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    seed: int = 0,
    chunk_tokens: int = 1024,
) -> Tensor:
    """``input_ids (B, L)`` followed by up to ``max_new_tokens`` new tokens per row: ``(B, L + n)``.

    Greedy at ``temperature`` 0, else sampled from ``softmax(logits / temperature)`` with a generator seeded by
    ``seed``. A row that produced ``eos_token_id`` goes on with it; generation stops when every row has. ``cache``
    (a ``BoundedCache``, empty or holding earlier text) is continued and left holding everything but the last token.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1 or chunk_tokens < 1:
        raise ValueError(f"max_new_tokens and chunk_tokens must be positive, got {max_new_tokens}, {chunk_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cache = cache if cache is not None else BoundedCache(model, block_size=chunk_tokens)
    generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    produced: list[Tensor] = []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    with decode_steps(model, cache) as steps:
        logits = steps.read(input_ids, chunk_tokens)
        for made in range(1, max_new_tokens + 1):
            token = pick_token(logits.float(), temperature, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            produced.append(token)
            if made == max_new_tokens:
                break
            all_done = steps.read_later(finished.all()) if eos_token_id is not None else None
            step = steps.ahead(token)  # runs on the GPU while the host waits to know whether it is wanted
            if all_done is not None and bool(all_done()):
                step.take_back()
                break
            logits = step.logits
    return torch.cat([input_ids, torch.stack(produced, dim=1)], dim=1)


def bounded_decoding(
    model: nn.Module,
    input_ids: Tensor,
    logits_processor: Callable[[Tensor, Tensor], Tensor],
    stopping_criteria: Callable[..., Tensor],
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    **model_kwargs: Any,
) -> Any:
    """The decoding loop for ``model.generate(..., custom_generate=bounded_decoding)`` with a ``BoundedCache``.

    transformers prepares everything (the generation config, logits processors, stopping criteria) and hands over
    before its prefill; this prefills the tokens the cache has not seen in chunks (``prefill_chunk_size`` of the
    generation config, else 1,024) and decodes greedily or by sampling as ``do_sample`` says, with transformers'
    processors and criteria at every step, as its own sampling loop does. A cache holding earlier text is continued:
    ``input_ids`` then starts with the tokens it has seen, as transformers expects of a filled cache. Returns the
    sequences, or a ``GenerateDecoderOnlyOutput`` (sequences, scores and logits if asked for, the cache) when
    ``return_dict_in_generate`` is set.

    transformers (5.17 to 5.25) hands a ``custom_generate`` callable neither ``streamer`` nor ``synced_gpus``: a
    streamer given to ``generate()`` sees the prompt and nothing after it. Without ``custom_generate`` it streams.
    """
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    cache = _bounded_cache_from(model_kwargs)
    _check_decoding_request(input_ids, cache, generation_config, synced_gpus, model_kwargs)
    chunk = int(getattr(generation_config, "prefill_chunk_size", None) or DEFAULT_PREFILL_CHUNK)
    want_dict = bool(generation_config.return_dict_in_generate)
    scores: list[Tensor] = []
    raw_logits: list[Tensor] = []
    pad = generation_config._pad_token_tensor
    stops_at_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)  # type: ignore[attr-defined]
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    with decode_steps(model, cache) as steps:
        logits = steps.read(input_ids[:, cache.get_seq_length() :], chunk).float()
        while True:
            next_scores = logits_processor(input_ids, logits)
            if want_dict and generation_config.output_scores:
                scores.append(next_scores)
            if want_dict and generation_config.output_logits:
                raw_logits.append(logits)
            if generation_config.do_sample:
                tokens = torch.multinomial(torch.softmax(next_scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = next_scores.argmax(dim=-1)
            if stops_at_eos and pad is not None:  # a finished row goes on with padding, as in transformers' loop
                tokens = tokens * unfinished + pad.to(tokens.device) * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            if streamer is not None:
                streamer.put(tokens.cpu())
            unfinished = unfinished & ~stopping_criteria(input_ids, next_scores)
            going_on = steps.read_later(unfinished.max())
            step = steps.ahead(tokens)  # runs on the GPU while the host waits to know whether it is wanted
            if int(going_on()) == 0:
                step.take_back()  # the cache holds every token but the last, as transformers' loop leaves it
                break
            logits = step.logits.float()
    if streamer is not None:
        streamer.end()
    if not want_dict:
        return input_ids
    output: Any = GenerateDecoderOnlyOutput  # its annotations say one-tensor tuples, it holds one per step
    return output(
        sequences=input_ids,
        scores=tuple(scores) if generation_config.output_scores else None,
        logits=tuple(raw_logits) if generation_config.output_logits else None,
        **generate_output_cache(cache),
    )


DEFAULT_PREFILL_CHUNK = 1024


def _bounded_cache_from(model_kwargs: dict[str, Any]) -> BoundedCache:
    caches = [model_kwargs.get(name) for name in CACHE_ARGUMENTS if model_kwargs.get(name) is not None]
    if not caches or not isinstance(caches[0], BoundedCache):
        given = type(caches[0]).__name__ if caches else "no cache"
        raise ValueError(
            f"bounded_decoding decodes a BoundedCache, got {given}: pass {cache_argument()}=BoundedCache(model) "
            "to generate()"
        )
    return caches[0]


def _check_decoding_request(
    input_ids: Tensor, cache: BoundedCache, config: Any, synced_gpus: bool, model_kwargs: dict[str, Any]
) -> None:
    """Refuse, by name, what this loop does not do rather than ignore it."""
    if synced_gpus:
        raise ValueError("bounded_decoding does not synchronise GPUs (synced_gpus=True): run generate() without it")
    if config.output_attentions or config.output_hidden_states:
        raise ValueError(
            "bounded_decoding returns no attentions or hidden states: leave output_attentions and "
            "output_hidden_states unset, or generate without custom_generate"
        )
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "bounded_decoding takes unpadded rows (the attention mask has zeros): generate each "
            "prompt on its own, or pad nothing"
        )
    seen = cache.get_seq_length()
    if input_ids.shape[1] <= seen:
        raise ValueError(
            f"the cache has seen {seen} tokens and input_ids holds {input_ids.shape[1]}: input_ids "
            "must start with the cached tokens and add at least one"
        )


class StepAhead:
    """A step launched before the caller knows whether it is wanted (``DecodeSteps.ahead``): ``logits`` if it is,
    ``take_back()`` if generation stopped at the token it read."""

    def __init__(self, steps: DecodeSteps, tokens: Tensor, launched: Tensor | None) -> None:
        self._steps, self._tokens, self._logits = steps, tokens, launched
        self._undoable = launched is not None  # made by the decoder with undoable=True

    @property
    def logits(self) -> Tensor:
        """The next logits ``(B, vocab)``; a step not launched ahead (the forward's) runs now."""
        if self._logits is None:
            self._logits = self._steps(self._tokens)
        return self._logits

    def take_back(self) -> None:
        """The state as it was before this step (a step that has not run is simply dropped)."""
        if self._undoable:
            self._steps.undo_last()
        elif self._logits is not None:
            raise RuntimeError("a step that ran when its logits were asked for cannot be taken back")
        self._undoable, self._logits = False, None


class DecodeSteps:
    """A prompt read, then one token per row at a time, through a graph decoder lent by the model's pool or else the
    model's forward (``decode_steps``). ``steps.read(ids, chunk_tokens)`` reads tokens the cache has not seen and
    returns the last one's logits; ``steps(tokens)`` is the next logits; a loop that must look at a token on the host
    before it knows whether to go on (an end-of-sequence token, a stop string, a line's end) instead asks for the
    values it needs with ``read_later`` and launches the step with ``ahead``, so the GPU runs the step while the host
    waits for those values, and takes the step back if generation stopped: the same tokens and the same final state as
    stepping only once it knows, without waiting for the GPU between steps."""

    def __init__(
        self,
        model: nn.Module,
        cache: BoundedCache,
        decoder: GraphModelDecoder | None = None,
        lending: contextlib.ExitStack | None = None,
    ) -> None:
        """``decoder``: one holding ``cache``; else, given ``lending`` (which gives it back when the steps end), one
        lent by the model's pool once the cache has states."""
        self.model, self.cache, self.decoder = model, cache, decoder
        self._lending = lending
        self._graphs = decoder is None and lending is not None and graph_decode_supported(model)
        self._lend()

    def _lend(self) -> None:
        """Borrow a decoder from the model's pool once the cache holds states (a fresh cache first reads its prompt),
        once per ``decode_steps``: a question read by steps and its answer share it, one adopt and one release."""
        if self._graphs and self.decoder is None and self.cache.states and self.cache.states[0] is not None:
            self._graphs = False  # lent once: a pool that lends none (a failed capture) is not asked again
            assert self._lending is not None  # _graphs needs it
            self.decoder = self._lending.enter_context(shared_decoder_pool(self.model).lend(self.cache))

    def read(self, input_ids: Tensor, chunk_tokens: int) -> Tensor:
        """Read ``input_ids (B, n)`` into the cache in chunks (whole ones through the model's CUDA graphs where they
        run, a short piece by decode steps, ``graph_prefill.prefill``); the last position's logits ``(B, vocab)``.
        Inference mode is entered here, not across a caller's yields: a web server may resume it on another
        thread."""
        cache = self.cache

        def forward(piece: Tensor) -> Tensor:
            return self.model(piece, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1]

        with torch.inference_mode():
            logits = prefill(
                self.model, cache, input_ids, chunk_tokens=chunk_tokens, forward=forward, decoder=self.decoder
            )
        assert logits is not None  # input_ids holds at least one token and forward returns logits
        self._lend()  # a fresh cache has states now
        if self.decoder is not None:
            try:
                self.decoder.adopt(cache)  # a piece read by the forward replaced the states; a no-op otherwise
            except GraphDecodeError as error:
                self._give_up_graphs(error)
        return logits

    def __call__(self, tokens: Tensor) -> Tensor:
        return self._step(tokens, undoable=False)

    def read_later(self, values: Tensor) -> Callable[[], Tensor]:
        """``values`` as they are now, on the host when the returned function is called. On CUDA the copy is queued
        now, so a step launched after this call does not delay it. With no step launched ahead nothing runs in
        between: the values are read where they are when asked for, as a loop without steps ahead reads them."""
        if values.device.type != "cuda" or not self._launches_ahead():
            return lambda: values
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(values.device))  # the copy's stream, on the model's GPU

        def wait() -> Tensor:
            copied.synchronize()
            return host

        return wait

    def ahead(self, tokens: Tensor) -> StepAhead:
        """The step of ``tokens`` launched now where it can be taken back (a graph decoder keeps the state before
        it), else left to run when its logits are asked for."""
        if self.decoder is not None and self._launches_ahead():
            try:
                return StepAhead(self, tokens, self.decoder(tokens, undoable=True))
            except GraphCaptureError as error:  # the state is untouched: the forward takes the step when asked
                self._give_up_graphs(error)
        return StepAhead(self, tokens, None)

    def _launches_ahead(self) -> bool:
        return self.decoder is not None and dispatch.launch_steps_ahead(self.decoder.capture)

    def undo_last(self) -> None:
        assert self.decoder is not None  # only a step the decoder made is launched ahead
        self.decoder.undo()

    def _step(self, tokens: Tensor, *, undoable: bool) -> Tensor:
        if self.decoder is not None:
            try:
                return self.decoder(tokens, undoable=undoable)
            except GraphCaptureError as error:
                self._give_up_graphs(error)
        with torch.inference_mode():
            return self.model(tokens[:, None], **cache_kwargs(self.cache), use_cache=True).logits[:, -1]

    def _give_up_graphs(self, error: GraphCaptureError | GraphDecodeError) -> None:
        warnings.warn(f"{error}; answers decode through the model's forward from now on", stacklevel=4)
        self.decoder = None


@contextlib.contextmanager
def decode_steps(model: nn.Module, cache: BoundedCache) -> Iterator[DecodeSteps]:
    """A prompt's read and the steps of every row (``DecodeSteps``), through one graph decoder lent by the model's
    shared pool where it runs (captured once per model and batch size, not once per call), else through the forward.
    A failed capture leaves the state untouched and the steps go on through the forward (the pool lends no decoder to
    later generations). On leaving, the cache holds tensors of its own again (the decoder's buffers are not shared).
    Each step enters inference mode on its own: a web server may resume a generator on another thread."""
    with contextlib.ExitStack() as lending:
        yield DecodeSteps(model, cache, lending=lending)


def pick_token(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """``(B, vocab)`` logits -> ``(B,)`` tokens: the argmax at ``temperature`` 0, else a draw from
    ``softmax(logits / temperature)`` with ``generator``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
