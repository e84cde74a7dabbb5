"""One coda-eval run (``EvalConfig``): every method on the same base model, perplexity through the
state at every length, pass keys and fact recall beyond the window; the report (``eval.json``,
``eval.md``, plots) is rewritten after each method (docs/evaluation.md).
"""

from __future__ import annotations

import copy
import datetime
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import BoundedConfig, parse_routing
from ..cpu_threads import set_cpu_threads
from ..data import load_essays
from ..data.facts import heldout_fact_haystack
from ..data.tokens import token_stream
from ..models.convert import retune_routing
from ..models.loader import load_model
from ..models.tiny import tiny_llama
from .eval_config import EvalConfig
from .fact_recall import fact_recall_rows
from .methods import build_method
from .passkey_rows import passkey_rows
from .perplexity import perplexity_rows, perplexity_texts
from .report import write_report


class EvaluationSetupError(ValueError):
    """A setting of this machine that the run cannot use (``--threads``); ``coda-eval`` ends with its
    message, a script can catch it."""


def evaluate(args: EvalConfig, command: str | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Measure every method of ``args`` and write the report to ``args.out`` after each (a run
    stopped from outside keeps what it measured); returns the results and the files written.
    ``command``: the command line that asked for it, recorded in the results."""
    args.check()
    routing = parse_routing(args.routing)  # a bad threshold fails before any model is loaded
    began = time.monotonic()
    deadline = began + args.time_budget if args.time_budget else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        try:
            set_cpu_threads(args.threads)
        except ValueError as exc:
            raise EvaluationSetupError(f"coda-eval: {exc}") from None
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base, tokenizer = _base_loader(args, device, dtype)
    ppl_texts, hay = _texts(args, tokenizer)
    window = BoundedConfig.preset(args.config, num_sink=args.num_sink).window
    results: dict[str, Any] = {
        "meta": _meta(args, device, dtype, command),
        "perplexity": [],
        "passkey": [],
        "facts": [],
    }
    fact_hay = _fact_haystack(args, tokenizer, hay) if args.fact_trials else []
    for name in tqdm(args.methods, desc="methods", unit="method"):
        model, bounded = build_method(name, args, base)
        if routing and name in ("coda-bounded", "gqa-bounded"):  # the baselines have no banks
            retune_routing(model, **routing)
        model.eval()
        for text, ids in ppl_texts.items():
            for row in perplexity_rows(model, bounded, ids, args.lengths, args.chunk, deadline):
                results["perplexity"].append({"method": name, "text": text, **row})
        for row in passkey_rows(model, bounded, tokenizer, hay, args, window, deadline):
            results["passkey"].append({"method": name, **row})
        for row in fact_recall_rows(model, bounded, tokenizer, fact_hay, args, window, deadline):
            results["facts"].append({"method": name, **row})
        del model
        # tables and plots after every method: a run stopped from outside keeps what it measured
        written = write_report(results, args.out)
    return results, written


def _base_loader(args: EvalConfig, device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], nn.Module], Any]:
    if args.tiny_model:
        model, byte_tokenizer = tiny_llama()
        model.to(device=device, dtype=dtype)
        return (lambda: copy.deepcopy(model)), byte_tokenizer

    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device=device, dtype=dtype)  # type: ignore[call-arg]  # functools.wraps on PreTrainedModel.to
    return (lambda: copy.deepcopy(model)), tokenizer


def _texts(args: EvalConfig, tokenizer: Any) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The perplexity texts (the longest length's first tokens of each) and the haystack tokens."""
    longest = max(args.lengths)
    if args.tiny_model:
        rng = random.Random(0)
        words = "alpha beta gamma delta river stone cloud paper window garden".split()
        text = " ".join(rng.choice(words) for _ in range(max(args.lengths + args.passkey_lengths)))
        stream = token_stream([text], tokenizer)
        return {"tiny": torch.tensor([stream[:longest]])}, stream
    hay = token_stream([d.text for d in load_essays("all")], tokenizer)
    return perplexity_texts(args.texts, longest, tokenizer), hay


def _fact_haystack(args: EvalConfig, tokenizer: Any, essays: list[int]) -> list[int]:
    """Held-out haystacks for fact documents: the essays (never trained on) and held-out Wikipedia."""
    if args.tiny_model:
        return essays

    return heldout_fact_haystack(tokenizer, essays)


def _meta(args: EvalConfig, device: torch.device, dtype: torch.dtype, command: str | None) -> dict[str, Any]:
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "weights": str(args.weights) if args.weights else None,
        "gqa_weights": str(args.gqa_weights) if args.gqa_weights else None,
        "config": args.config,
        "num_sink": args.num_sink,
        "routing": list(args.routing),
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "settings": args.as_record(),
    }
