"""The factorial's control arm (plain GQA trained the same way, with a full cache or the same
banks) and coda-eval's perplexity on the same tokens at every length, on a tiny random Llama."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_training import train_tiny

from coda_gqa_l.baseline import BaselineGQA
from coda_gqa_l.evaluation.eval_config import EvalConfig
from coda_gqa_l.evaluation.methods import build_method
from coda_gqa_l.evaluation.perplexity import check_lengths, perplexity_rows
from coda_gqa_l.models import convert, to_bounded
from coda_gqa_l.models.adapters import CoDAAttentionAdapter
from coda_gqa_l.models.lora import add_lora
from coda_gqa_l.models.params import select_trainable
from coda_gqa_l.models.tiny import tiny_llama
from coda_gqa_l.models.weights import WeightsFileError, read_coda_meta, read_coda_weights


def _adapters(model: torch.nn.Module) -> list[CoDAAttentionAdapter]:
    return [m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)]


def test_to_bounded_keeps_a_plain_core_and_adds_the_banks() -> None:
    model, _ = tiny_llama()
    convert(model, None, differential=False)
    add_lora(model, rank=4)
    assert not any(n.endswith(("theta", "gate_proj.weight")) for n in select_trainable(model, "coda+lora"))
    with pytest.raises(ValueError, match="selects no parameter"):
        select_trainable(model, "coda")
    cores = [a.layer.core for a in _adapters(model)]
    to_bounded(model, "tiny")
    adapters = _adapters(model)
    assert [a.layer.core for a in adapters] == cores and all(a.bounded for a in adapters)
    assert all(not a.layer.config.differential for a in adapters)
    assert model.config.coda_gqa_l["differential"] is False
    trainable = select_trainable(model, "coda+lora")
    assert any(n.endswith("gate_proj.weight") for n in trainable)  # the write gate trains
    assert not any(n.endswith("core.theta") for n in trainable)
    assert model(torch.randint(0, 256, (1, 300))).logits.isfinite().all()


def test_convert_differential_false_gives_bounded_plain_gqa() -> None:
    """``convert(model, preset, differential=False)`` is the factorial's bounded control (it was ignored for a
    bounded config, and the model came back differential)."""
    model, _ = tiny_llama()
    convert(model, "tiny", differential=False)
    adapters = _adapters(model)
    assert all(a.bounded and not a.layer.config.differential for a in adapters)
    assert not any(n.endswith("core.theta") for n, _ in model.named_parameters())


def test_gqa_arm_trains_and_evaluates_as_the_factorial_control(tmp_path: Path) -> None:
    out = tmp_path / "gqa"
    assert train_tiny(out, "--attention", "gqa") == 0
    _, meta = read_coda_weights(out / "coda.safetensors")
    assert meta["convert"]["differential"] is False and meta["training"]["attention"] == "gqa"
    assert meta["convert"]["bounded"] is not None

    args = EvalConfig(config="tiny", num_sink=2, weights=None, gqa_weights=out / "coda.safetensors")
    base = lambda: tiny_llama()[0]  # noqa: E731
    bounded_model, bounded = build_method("gqa-bounded", args, base)
    assert bounded and all(a.bounded and not a.layer.config.differential for a in _adapters(bounded_model))
    full_model, bounded = build_method("gqa-unbounded", args, base)
    assert not bounded and all(isinstance(a.layer, BaselineGQA) for a in _adapters(full_model))
    # the unbounded arm keeps the trained LoRA of the bounded one
    trained = dict(bounded_model.named_parameters())
    for name, param in full_model.named_parameters():
        if name.endswith("lora_b"):
            torch.testing.assert_close(param, trained[name])
    cold, _ = build_method("gqa-bounded", dataclasses.replace(args, gqa_weights=None), base)
    assert all(a.bounded and not a.layer.config.differential for a in _adapters(cold))
    with pytest.raises(ValueError, match="needs differential"):
        build_method("coda-bounded", dataclasses.replace(args, weights=args.gqa_weights), base)


def test_gqa_arm_continues_from_its_own_weights_file(tmp_path: Path) -> None:
    """The factorial's control repeats the CoDA arm's staged history (a run, then more phase 2
    from its file): a bounded GQA file must be accepted as --init-weights for --attention gqa."""
    first = tmp_path / "stage1"
    assert train_tiny(first, "--attention", "gqa", "--gate-weight", "0") == 0
    second = tmp_path / "stage2"
    assert train_tiny(second, "--attention", "gqa", "--init-weights", str(first / "coda.safetensors")) == 0
    training = read_coda_meta(second / "coda.safetensors")["training"]
    assert training["updates"] == {"phase1": 0, "phase2": 2}  # a bounded file starts in phase 2
    assert training["started_from"]["training"]["gate_supervision"]["weight"] == 0.0
    with pytest.raises(WeightsFileError, match="not --attention coda"):
        train_tiny(tmp_path / "wrong", "--init-weights", str(first / "coda.safetensors"))


def test_training_with_other_routing_thresholds_and_continuing_from_that_file(tmp_path: Path) -> None:
    first = tmp_path / "retuned"
    assert train_tiny(first, "--routing", "novelty=0.9", "match=0.97", "max_inserts=4") == 0
    bounded = read_coda_meta(first / "coda.safetensors")["convert"]["bounded"]
    assert (bounded["novelty"], bounded["match"], bounded["max_inserts"]) == (0.9, 0.97, 4)
    weights = str(first / "coda.safetensors")
    with pytest.raises(WeightsFileError, match="pass --routing"):
        train_tiny(tmp_path / "preset", "--init-weights", weights)
    routing = ["--routing", "novelty=0.9", "match=0.97", "max_inserts=4"]
    assert train_tiny(tmp_path / "more", "--init-weights", weights, *routing) == 0
    with pytest.raises(SystemExit, match="--routing takes NAME=VALUE"):
        train_tiny(tmp_path / "bad", "--routing", "window=64")


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_tiny(out, "--time-budget", "0") == 0
    with pytest.raises(SystemExit, match="--attention coda \\(now gqa\\)"):
        train_tiny(out, "--resume", "--attention", "gqa")


@torch.no_grad()
def test_perplexity_scores_the_same_tokens_at_every_length() -> None:
    model, _ = tiny_llama()
    ids = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(0))
    rows = perplexity_rows(model, False, ids, [128, 256, 512], chunk=96)
    assert [r["windows"] for r in rows] == [4, 2, 1]
    assert {r["scored_tokens"] for r in rows} == {511 - 3}  # positions 128, 256, 384 never count
    # the reference: each 128-token window in one plain forward pass
    windows = ids.view(4, 128)
    logits = model(windows).logits[:, :-1]
    reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1))
    assert math.isclose(rows[0]["ppl"], math.exp(reference.item()), rel_tol=1e-5)


def test_lengths_must_nest() -> None:
    check_lengths([2048, 4096, 16384])
    with pytest.raises(ValueError, match="must divide the longest"):
        check_lengths([2048, 3000, 16384])


def test_training_can_start_from_a_weights_file(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert train_tiny(first) == 0
    weights = first / "coda.safetensors"
    second = tmp_path / "second"
    assert train_tiny(second, "--init-weights", str(weights)) == 0  # bounded weights: phase 2 only
    log = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [2, 2]
    # the new file keeps the history of the one it started from
    history = read_coda_meta(second / "coda.safetensors")["training"]
    assert history["updates"]["phase2"] == 2 and history["started_from"]["file"] == "coda.safetensors"
    assert history["started_from"]["training"] == read_coda_meta(weights)["training"]
    with pytest.raises(WeightsFileError, match="not --attention gqa"):
        train_tiny(tmp_path / "third", "--init-weights", str(weights), "--attention", "gqa")
    with pytest.raises(WeightsFileError, match="LoRA rank 8, not --lora-rank 4"):
        train_tiny(tmp_path / "third", "--init-weights", str(weights), "--lora-rank", "4")


@pytest.mark.slow
def test_coda_train_under_torchrun_with_two_processes(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tiny_training import TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29700 + os.getpid() % 100), "-m", "coda_gqa_l.training.cli", "--tiny-model", "--corpus", str(corpus),
               "--config", "tiny", "--num-sink", "2", "--phase1-steps", "2", "--phase2-steps", "2", "--seq-len", "128",
               "--phase2-seq-len", "512", "--batch-size", "2", "--accum", "2", "--needle-distance", "256",
               "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]  # rank 0 alone logs
    _, meta = read_coda_weights(out / "coda.safetensors")
    assert meta["training"]["completed"] is True


def test_baselines_use_every_slot_of_the_bounded_config() -> None:
    from coda_gqa_l.config import BoundedConfig

    args = EvalConfig(config="medium", num_sink=4, weights=None, gqa_weights=None)
    slots = BoundedConfig.preset("medium", num_sink=4).storage_slots  # 384
    base = lambda: tiny_llama()[0]  # noqa: E731
    for name, sinks in (("window", 0), ("streaming", 4)):
        model, bounded = build_method(name, args, base)
        config = _adapters(model)[0].layer.config
        assert bounded and config.storage_slots == slots and config.num_sink == sinks
        assert config.window - config.segment + 1 >= slots - sinks - 3  # at least 377 of 380 recent tokens visible


def test_gqa_arm_driver_runs_every_stage_and_skips_finished_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from tiny_training import TEXT

    spec = importlib.util.spec_from_file_location(
        "train_gqa_arm", Path(__file__).parents[2] / "benchmarks/train_gqa_arm.py"
    )
    assert spec is not None and spec.loader is not None
    driver = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_gqa_arm", driver)  # its dataclass looks itself up there
    spec.loader.exec_module(driver)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    argv = ["--out", str(tmp_path / "arm"), "--smoke", "--corpus", str(corpus)]
    assert driver.main(argv) == 0
    final = read_coda_meta(tmp_path / "arm/stage3/coda.safetensors")["training"]
    assert final["attention"] == "gqa" and final["gate_supervision"]["weight"] == 1.0
    chain = final["started_from"]["training"]["started_from"]["training"]["started_from"]["training"]
    assert chain["updates"] == {"phase1": 1, "phase2": 0}  # stage 1a: phase 1 only
    capsys.readouterr()
    assert driver.main(argv) == 0  # a second run finds every stage complete
    assert capsys.readouterr().out.count("is complete; skipped") == len(driver.STAGES)
