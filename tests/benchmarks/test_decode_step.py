"""Smoke test of benchmarks/decode_step.py in its --quick mode (CPU, Triton's interpreter, a tiny random Llama), and
the switch it measures: inside ``dispatch.separate_step_inputs()`` a plain step does not take the one-pass path."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import run_benchmark_in_interpreter, tiny_bounded_llama

from coda_gqa_l.decode import one_pass_step_inputs
from coda_gqa_l.kernels import dispatch
from coda_gqa_l.models.inference import fold_for_inference


def test_quick_run_decodes_the_same_tokens_on_every_path(tmp_path: Path) -> None:
    # one switch beside the default (each variant decodes its own cache in the interpreter: CI's time is short; the
    # other switches' paths are compared with the model's forward in tests/models/test_graph_decode.py)
    variants = ["separate inputs"]
    done = run_benchmark_in_interpreter("decode_step.py", "--quick", "--out", str(tmp_path), "--variants", *variants)
    result = json.loads((tmp_path / "decode_step.json").read_text())
    rows = result["variants"]
    assert list(rows) == ["default", *variants]  # the default is always measured first
    for row in rows.values():
        assert len(row["tokens_per_s"]) == 2 and row["median_tokens_per_s"] > 0
        # float32 in the interpreter: every path picks the default's greedy tokens
        assert row["first_repeat_tokens"] == rows["default"]["first_repeat_tokens"]
    lines = done.stdout.strip().splitlines()
    assert lines[-len(rows) - 1].startswith("default")  # the table,
    assert lines[-1].startswith("wrote ")  # then where the JSON went


def test_the_switch_turns_the_one_pass_step_inputs_off() -> None:
    model = tiny_bounded_llama(2)
    fold_for_inference(model)
    layer = model.model.layers[0].self_attn.layer
    assert one_pass_step_inputs(layer)
    with dispatch.separate_step_inputs():
        assert not one_pass_step_inputs(layer)
    assert one_pass_step_inputs(layer)
