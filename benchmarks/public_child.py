"""Measure the public ``coda-gqa-l`` package's bounded layer, in a process of its own.

Started by ``public_package.py`` with ``PYTHONPATH`` pointing at an unzipped public wheel and not
at our ``src`` (both import as ``coda_gqa_l``); the one argument is a JSON spec. It measures, per
configuration, bounded prefill tokens/s at each length and decode tokens/s at each context, with
the same helpers and settings as the suite, and prints one line per result to stdout:

    @@ROW {json}        a measurement row (status ok, error or skipped)
    @@DONE config       every row of that configuration was printed
    @@BROKEN            an error left the CUDA context unusable; the parent starts a fresh process

Errors are recorded as rows, never hidden. Progress goes to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    CONFIG_SLOTS,
    Settings,
    Shape,
    cuda_context_usable,
    error_fields,
    measure,
    peak_memory,
    release_memory,
    skipped,
    tokens_per_s,
)


def emit(tag: str, payload: object = "") -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    print(f"@@{tag} {text}".rstrip(), flush=True)


def import_public(package_dir: str) -> tuple[Any, str]:
    """The public layer class and the package version, after checking which package loaded."""
    package = importlib.import_module("coda_gqa_l")
    location = Path(package.__file__ or "").resolve()
    if Path(package_dir).resolve() not in location.parents:
        raise ImportError(f"coda_gqa_l was imported from {location}, not from the public wheel at {package_dir}")
    return package.CoDAGQALandmarkPerf2, importlib.metadata.version("coda-gqa-l")


class PublicLayer:
    """The public bounded layer at one shape and configuration, through its own API."""

    def __init__(self, layer_class: Any, shape: Shape, config: str, settings: Settings, block_size: int):
        window, exact, summary = CONFIG_SLOTS[config]
        self.settings, self.block_size, self.shape = settings, block_size, shape
        with torch.device(settings.device):
            self.layer = layer_class(
                embed_dim=shape.embed_dim,
                num_heads=shape.num_heads,
                num_kv_heads=shape.num_kv_heads,
                window=window,
                num_landmarks_exact=exact,
                num_landmarks_summary=summary,
            )
        self.layer = self.layer.to(settings.torch_dtype).eval()

    def new_state(self) -> Any:
        device = torch.device(self.settings.device)
        return self.layer.init_state(batch_size=1, device=device, dtype=self.settings.torch_dtype)

    def tokens(self, length: int) -> torch.Tensor:
        return torch.randn(
            1, length, self.shape.embed_dim, device=self.settings.device, dtype=self.settings.torch_dtype
        )

    def prefill(self, x: torch.Tensor, state: Any, return_outputs: bool = True) -> Any:
        return self.layer.prefill_chunked(x, state, block_size=self.block_size, return_outputs=return_outputs)

    def state_bytes(self) -> int:
        return int(self.layer.cache_bytes(batch_size=1, dtype=self.settings.torch_dtype))


def prefill_rows(public: PublicLayer, base: dict[str, Any], lengths: list[int], deadline: float) -> list[dict]:
    rows = []
    for length in lengths:
        row = base | {"section": "prefill", "length": length}
        if time.time() > deadline:
            rows.append(row | skipped("the suite's time budget for the public package ran out"))
            continue
        x = public.tokens(length)
        try:
            with torch.inference_mode(), peak_memory(public.settings.device) as memory:
                timing = measure(lambda x=x: public.prefill(x, public.new_state()), public.settings)
            row |= {"status": "ok", **timing, "tokens_per_s": tokens_per_s(length, timing["median_ms"])}
            row |= memory.fields()
        except Exception as exc:
            row |= error_fields(exc)
        rows.append(row)
        if row["status"] == "error" and not cuda_context_usable(public.settings.device):
            break
    return rows


def decode_rows(public: PublicLayer, base: dict[str, Any], contexts: list[int], deadline: float) -> list[dict]:
    rows = []
    state = None
    for context in sorted(contexts):
        itemsize = torch.empty((), dtype=public.settings.torch_dtype).element_size()
        full = 2 * context * public.shape.num_kv_heads * public.shape.head_dim * itemsize
        row = base | {"section": "decode", "context": context, "full_cache_bytes": full}
        if time.time() > deadline:
            rows.append(row | skipped("the suite's time budget for the public package ran out"))
            continue
        try:
            with torch.inference_mode():
                state = state if state is not None else public.new_state()
                if context > state.pos:
                    public.prefill(public.tokens(context - state.pos), state, return_outputs=False)
                row["start_position"] = int(state.pos)
                x_t = public.tokens(1)
                with peak_memory(public.settings.device) as memory:
                    timing = measure(
                        lambda x_t=x_t, state=state: public.layer.step(x_t, state),
                        public.settings,
                        iters=public.settings.decode_steps,
                    )
            row |= {"status": "ok", "how": "eager step", **timing, "tokens_per_s": 1e3 / timing["median_ms"]}
            row |= memory.fields() | {"state_bytes": public.state_bytes()}
        except Exception as exc:
            row |= error_fields(exc)
        rows.append(row)
        if row["status"] == "error":
            break  # the state is in an unknown condition; later contexts would build on it
    return rows


def main() -> None:
    spec = json.loads(sys.argv[1])
    settings = Settings(**spec["settings"])
    settings.apply_threads()
    shape = Shape(**spec["shape"])
    layer_class, version = import_public(spec["package_dir"])
    for config in spec["configs"]:
        base = {"shape": shape.name, "method": f"public-{version}-{config}", "package": f"coda-gqa-l=={version}"}
        base["block_size"] = spec["block_size"]
        try:
            public = PublicLayer(layer_class, shape, config, settings, spec["block_size"])
            rows = prefill_rows(public, base, spec["lengths"], spec["deadline_unix"])
            if cuda_context_usable(settings.device):
                rows += decode_rows(public, base, spec["contexts"], spec["deadline_unix"])
            del public
        except Exception as exc:
            rows = [base | {"section": "public"} | error_fields(exc)]
        for row in rows:
            emit("ROW", row)
            print(
                f"{row['method']} {row['section']} {row.get('length', row.get('context'))}: {row['status']}",
                file=sys.stderr,
            )
        emit("DONE", config)
        if not cuda_context_usable(settings.device):
            emit("BROKEN")
            sys.exit(3)
        release_memory(settings.device)


if __name__ == "__main__":
    main()
