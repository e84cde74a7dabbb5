"""coda-train's parts on a tiny random Llama: LoRA, the phase switch, weights files, checkpoints
and resume, retrieval documents, and coda-eval's report."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from tiny_training import TEXT
from tiny_training import train_tiny as _train

from coda_gqa_l.data.passkey import (
    EVAL_PHRASINGS,
    TRAIN_PHRASINGS,
    answer_correct,
    make_document,
    wilson_interval,
)
from coda_gqa_l.models import convert, to_bounded
from coda_gqa_l.models.adapters import CoDAAttentionAdapter
from coda_gqa_l.models.lora import LoRALinear, add_lora
from coda_gqa_l.models.params import select_trainable
from coda_gqa_l.models.tiny import tiny_llama
from coda_gqa_l.models.weights import WeightsFileError, apply_coda_weights, save_coda_weights


def _ids(n: int = 96) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))


def test_lora_starts_as_the_identity_and_trains() -> None:
    model, _ = tiny_llama()
    convert(model, None)
    before = model(_ids()).logits
    assert add_lora(model, rank=4) == 8  # q/k/v/o of 2 layers
    torch.testing.assert_close(model(_ids()).logits, before)
    params = select_trainable(model, "coda+lora")
    assert any(n.endswith("lora_b") for n in params) and not any(n.endswith("base.weight") for n in params)
    assert not any(".mlp." in n for n in params)  # the MLP's gate_proj is not the write gate
    assert sum(p.numel() for p in params.values()) < 0.1 * sum(p.numel() for p in model.parameters())
    model(_ids()).logits.square().mean().backward()
    assert all(p.grad is not None for n, p in params.items() if n.endswith("lora_a") or n.endswith("lora_b"))


def test_to_bounded_keeps_the_trained_core() -> None:
    model, _ = tiny_llama()
    convert(model, None)
    add_lora(model, rank=4)
    cores = [m.layer.core for m in model.modules() if isinstance(m, CoDAAttentionAdapter)]
    to_bounded(model, "tiny")
    adapters = [m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)]
    assert [a.layer.core for a in adapters] == cores and all(a.bounded for a in adapters)
    assert isinstance(adapters[0].layer.core.q_proj, LoRALinear)
    assert model(_ids(300)).logits.isfinite().all()
    with pytest.raises(ValueError, match="not unbounded attention"):
        to_bounded(model, "tiny")


def test_weights_file_round_trip_and_refusals(tmp_path: Path) -> None:
    model, _ = tiny_llama()
    convert(model, None)
    add_lora(model, rank=4)
    to_bounded(model, "tiny")
    with torch.no_grad():
        for p in select_trainable(model, "coda+lora").values():
            p.add_(0.01 * torch.randn_like(p))
    path = save_coda_weights(model, tmp_path / "w.safetensors", base="tiny-llama", dtype=torch.float32)
    fresh, _ = tiny_llama()
    apply_coda_weights(fresh, path)
    torch.testing.assert_close(fresh(_ids(300)).logits, model(_ids(300)).logits)

    other, _ = tiny_llama()
    other.config.hidden_size = 96  # another base model's shape
    with pytest.raises(WeightsFileError, match="another base model"):
        apply_coda_weights(other, path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsFileError, match="not a readable safetensors"):
        apply_coda_weights(tiny_llama()[0], tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsFileError, match="not a CoDA weights file"):
        apply_coda_weights(tiny_llama()[0], tmp_path / "plain.safetensors")


def test_documents_put_the_key_far_before_the_question() -> None:
    _, tok = tiny_llama()
    hay = tok.encode(TEXT)
    rng = random.Random(3)
    for split, keys in (("eval", 1), ("train", 3)):
        doc = make_document(tok, hay, rng, length=900, depth=0.2, num_keys=keys, split=split, min_distance=256)
        assert len(doc.ids) == 900 and len(doc.needle_positions) == keys
        assert doc.answer_start - max(doc.needle_positions) >= 256
        assert tok.decode(doc.ids[doc.answer_start :].tolist()).strip() == doc.asked.key
        spelled = tok.decode(doc.ids[doc.key_positions].tolist())  # the keys' tokens, every needle
        assert spelled.isdigit() and doc.asked.key in spelled and len(doc.key_positions) >= 5 * keys
        assert all(p < doc.answer_start - 256 for p in doc.key_positions)
        logits = torch.full((900, 257), -1.0)
        logits[torch.arange(899), doc.ids[1:]] = 1.0  # a model that predicts every next token
        assert answer_correct(logits, doc) and answer_correct(logits[500:], doc, offset=500)
        logits[doc.answer_start - 1, doc.ids[doc.answer_start]] = -2.0
        assert not answer_correct(logits, doc)
    assert not any("pass key" in s + q for s, q in TRAIN_PHRASINGS)
    assert all("pass key" in s for s, _ in EVAL_PHRASINGS)
    with pytest.raises(ValueError, match="cannot put a needle"):
        make_document(tok, hay, rng, length=300, depth=0.5, min_distance=256)
    low, high = wilson_interval(40, 50)
    assert 0.66 < low < 0.8 < high < 0.9


def test_coda_train_runs_both_phases_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out, "--time-budget", "0") == 0  # stops at once, checkpointed
    assert (out / "checkpoint.safetensors").exists() and not (out / "coda.safetensors").exists()
    assert _train(out, "--resume") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in log)
    assert any(r["answer"] > 0 for r in log if r["phase"] == 2)  # retrieval documents were trained on
    assert all(r["gate"] == 0 for r in log if r["phase"] == 1) and all(r["gate"] > 0 for r in log if r["phase"] == 2)
    fresh, _ = tiny_llama()
    apply_coda_weights(fresh, out / "coda.safetensors")
    assert all(a.bounded for a in fresh.modules() if isinstance(a, CoDAAttentionAdapter))


def test_coda_eval_writes_tables_and_plots(tmp_path: Path) -> None:
    from coda_gqa_l.evaluation.cli import main

    args = ["--tiny-model", "--config", "tiny", "--num-sink", "2", "--lengths", "256", "512"]
    args += ["--passkey-lengths", "768", "--depths", "0.1", "--trials", "2", "--batch", "2", "--chunk", "128"]
    args += ["--routing", "novelty=0.8", "match=0.95", "--out", str(tmp_path)]
    assert main(args) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["meta"]["routing"] == ["novelty=0.8", "match=0.95"]
    assert {r["method"] for r in results["perplexity"]} == {
        "original", "window", "streaming", "coda-unbounded", "coda-bounded"
    }  # fmt: skip
    assert all(r["min_needle_distance"] >= 256 for r in results["passkey"])
    assert (tmp_path / "perplexity.png").stat().st_size > 0 and (tmp_path / "passkey.png").exists()
    assert "| streaming |" in (tmp_path / "eval.md").read_text()
    assert "routing novelty=0.8 match=0.95." in (tmp_path / "eval.md").read_text()
    with pytest.raises(ValueError, match="--routing"):
        main(args[:-5] + ["--routing", "segment=8", "--out", str(tmp_path)])


def test_coda_eval_fills_the_config_a_benchmark_builds_by_name(tmp_path: Path) -> None:
    """coda-eval's options are EvalConfig's fields with the same defaults; a config built in Python
    runs the same measurement as the command line (same rows) and is checked before any model loads."""
    from coda_gqa_l.evaluation.cli import build_parser, main, parse_args
    from coda_gqa_l.evaluation.eval_config import EvalConfig
    from coda_gqa_l.evaluation.run import evaluate

    assert parse_args([]) == EvalConfig()
    argv = ["--tiny-model", "--config", "tiny", "--num-sink", "2", "--lengths", "256", "512", "--trials", "0",
            "--methods", "window", "coda-bounded", "--chunk", "128"]  # fmt: skip
    config = EvalConfig.preset("smoke", trials=0, methods=["window", "coda-bounded"], chunk=128)
    assert parse_args(argv) == dataclasses.replace(config, passkey_lengths=EvalConfig().passkey_lengths, batch=10)
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    results, written = evaluate(dataclasses.replace(config, out=tmp_path / "py"))
    from_cli = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert [r["ppl"] for r in results["perplexity"]] == pytest.approx([r["ppl"] for r in from_cli["perplexity"]])
    assert tmp_path / "py" / "eval.md" in written
    namespace = build_parser().parse_args([])
    namespace.unknown_option = 1
    with pytest.raises(ValueError, match="unknown_option"):
        EvalConfig.from_namespace(namespace)
    with pytest.raises(ValueError, match="must divide the longest"):
        evaluate(EvalConfig.preset("smoke", lengths=[256, 384]))
    with pytest.raises(ValueError, match="unknown methods"):
        EvalConfig(methods=["oracle"]).check()
    with pytest.raises(ValueError, match="at least one method"):
        EvalConfig(methods=[]).check()


def test_coda_eval_time_budget_bounds_perplexity_too(tmp_path: Path) -> None:
    from coda_gqa_l.evaluation.cli import main

    args = ["--tiny-model", "--config", "tiny", "--num-sink", "2", "--lengths", "256", "512", "--trials", "0"]
    args += ["--methods", "window", "streaming", "--chunk", "128", "--time-budget", "1e-9", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "eval.json").read_text())["perplexity"]
    assert len(rows) == 4 and all(r["status"] == "skipped (time budget)" for r in rows)
    assert "| window | skipped | skipped | - |" in (tmp_path / "eval.md").read_text()


@pytest.mark.slow
def test_shipped_weights_load_on_the_packaged_model() -> None:
    from coda_gqa_l.models.pretrained import SHIPPED_WEIGHTS, load_coda_smollm2, shipped_config
    from coda_gqa_l.models.weights import read_coda_weights

    assert SHIPPED_WEIGHTS.stat().st_size < 4 * 2**20
    tensors, meta = read_coda_weights(SHIPPED_WEIGHTS)
    assert meta["base"] == "smollm2-135m-instruct" and meta["lora"] == {"rank": 8, "alpha": 16.0}
    model, tokenizer = load_coda_smollm2(progress=False, merge_adapters=False)  # the adapters as trained
    adapters = [m for m in model.modules() if isinstance(m, CoDAAttentionAdapter)]
    assert len(adapters) == 30 and all(a.bounded and a.layer.config == shipped_config() for a in adapters)
    name = next(n for n in tensors if n.endswith("lora_b"))
    torch.testing.assert_close(dict(model.named_parameters())[name].detach(), tensors[name].float())
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    logits = model(ids).logits
    assert logits.isfinite().all()
    merged, _ = load_coda_smollm2(progress=False)  # the default, for inference: adapters folded, same function
    torch.testing.assert_close(merged(ids).logits, logits, atol=1e-3, rtol=1e-4)


def test_gate_hinge_pushes_keys_up_and_the_rest_down() -> None:
    """The write-gate hinge: zero once keys are above ``keep`` and the rest below ``drop``;
    otherwise its gradient raises the keys' logits and lowers the others'."""
    from coda_gqa_l.training.gate_supervision import gate_hinge_loss

    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[0, 3:5] = True
    settled = torch.where(keep[..., None], 2.0, -6.0).expand(2, 10, 3)
    assert gate_hinge_loss([settled, settled], keep, 0.6, 0.01).item() == 0.0
    z = torch.full((2, 10, 3), -2.0, requires_grad=True)  # every gate at the initial 0.12
    loss = gate_hinge_loss([z], keep, 0.6, 0.01)
    loss.backward()
    assert loss.item() > 0 and (z.grad[keep] < 0).all() and (z.grad[~keep] > 0).all()
    with pytest.raises(ValueError, match="drop_prob < keep_prob"):
        gate_hinge_loss([z], keep, 0.01, 0.6)
    with pytest.raises(ValueError, match="do not match"):
        gate_hinge_loss([z], keep[:, :5], 0.6, 0.01)
    with pytest.raises(ValueError, match="refuse must be one of"):
        gate_hinge_loss([z], keep, 0.6, 0.01, refuse="some")


@pytest.mark.parametrize("length", [100, 1000])
def test_gate_hinge_violations_weigh_each_false_write_alike(length: int) -> None:
    """``refuse="violations"``: one ordinary token above ``drop`` costs the same in a short row as
    in a long one (its gradient does not shrink with the row), while ``"tokens"`` dilutes it by the
    row's length; tokens already below ``drop`` get no gradient either way."""
    from coda_gqa_l.training.gate_supervision import _logit, gate_hinge_loss

    keep = torch.zeros(1, length, dtype=torch.bool)
    keep[0, 0] = True
    z = torch.full((1, length, 1), _logit(0.001))
    z[0, 0] = 3.0  # the key, settled
    z[0, 7] = _logit(0.01) + 2.0  # one false write, 2 logits above drop
    z.requires_grad_(True)
    per_violation = gate_hinge_loss([z], keep, 0.6, 0.01, refuse="violations")
    per_violation.backward()
    assert per_violation.item() == pytest.approx(2.0, abs=1e-5)
    assert z.grad[0, 7, 0].item() == pytest.approx(1.0)
    assert (z.grad[0, 8:] == 0).all() and z.grad[0, 0, 0].item() == 0.0
    z.grad = None
    diluted = gate_hinge_loss([z], keep, 0.6, 0.01, refuse="tokens")
    diluted.backward()
    assert diluted.item() == pytest.approx(2.0 / (length - 1), rel=1e-4)
    assert z.grad[0, 7, 0].item() == pytest.approx(1.0 / (length - 1), rel=1e-4)


def test_gate_supervision_trains_the_gates(tmp_path: Path) -> None:
    """Phase 2 with the hinge and a gate learning rate of its own: the hinge falls update by update
    (retrieval rows only, so every batch has keys), and the weights file records the settings."""
    from coda_gqa_l.models.weights import read_coda_meta

    out = tmp_path / "run"
    settings = ("--phase1-steps", "0", "--phase2-steps", "3", "--gate-lr", "0.05", "--retrieval-fraction", "1.0")
    assert _train(out, *settings) == 0
    hinge = [json.loads(line)["gate"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(hinge) == 3 and hinge[2] < hinge[1] < hinge[0]
    recorded = read_coda_meta(out / "coda.safetensors")["training"]["gate_supervision"]
    assert recorded == {"weight": 1.0, "keep": 0.6, "drop": 0.01, "refuse": "tokens", "lr": 0.05}
    with pytest.raises(SystemExit, match="gate-lr 0.05 \\(now None\\)"):  # the optimizer's groups would differ
        _train(out, "--phase1-steps", "0", "--phase2-steps", "4", "--resume")
    with pytest.raises(SystemExit, match="tau_exact"):  # a keep target below the write threshold keeps nothing
        _train(tmp_path / "bad", "--gate-keep", "0.05")


def test_retuned_weights_file_keeps_the_tensors_and_records_why(tmp_path: Path) -> None:
    from coda_gqa_l.models.pretrained import SHIPPED_WEIGHTS
    from coda_gqa_l.models.weights import WeightsFileError, _write, read_coda_weights, retune_weights_file

    target = tmp_path / "retuned.safetensors"
    retune_weights_file(SHIPPED_WEIGHTS, target, {"novelty": 0.8, "max_inserts": 4}, reason="a test")
    (before, old), (after, new) = read_coda_weights(SHIPPED_WEIGHTS), read_coda_weights(target)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (new["convert"]["bounded"]["novelty"], new["convert"]["bounded"]["max_inserts"]) == (0.8, 4)
    assert new["convert"]["bounded"]["match"] == old["convert"]["bounded"]["match"]
    record = new["training"]["routing_retuned"][-1]
    assert record == {"from": {"novelty": 0.9, "max_inserts": 16}, "to": {"novelty": 0.8, "max_inserts": 4},
                      "reason": "a test"}  # fmt: skip
    with pytest.raises(ValueError, match="novelty <= match"):
        retune_weights_file(SHIPPED_WEIGHTS, target, {"novelty": 0.99}, reason="bad")
    with pytest.raises(ValueError, match="not a routing threshold"):
        retune_weights_file(SHIPPED_WEIGHTS, target, {"window": 128}, reason="bad")
    assert read_coda_weights(target)[1] == new  # a refused retune leaves the file as it was
    phase1 = tmp_path / "phase1.safetensors"
    tensors, meta = read_coda_weights(SHIPPED_WEIGHTS)
    _write(tensors, {**meta, "convert": {**meta["convert"], "bounded": None}}, phase1)
    with pytest.raises(WeightsFileError, match="no bank routing"):
        retune_weights_file(phase1, target, {"novelty": 0.8}, reason="bad")


def test_fact_rows_and_recurring_keep_targets(tmp_path: Path) -> None:
    """Phase 2 with fact documents only: each row asks about facts in the training split, its answer
    tokens are scored and its keep targets are the values' tokens; plain rows with --recurring-keep
    mark capitalised words and numbers that occur again two windows later."""
    from coda_gqa_l.data.training_rows import RecurringTokens, batches

    _, tok = tiny_llama()
    text = TEXT + " Tobias went north. " + TEXT[:2000] + " Tobias came back in 1987."
    stream = tok.encode(text)
    rows = batches(stream, tok, seq_len=600, batch_size=4, seed=0, fact_fraction=1.0, min_distance=256)
    batch = next(rows)
    assert batch.input_ids.shape == (4, 600) and batch.keep_mask.any(1).all() and batch.answer_mask.any(1).all()
    for ids, keep, answer in zip(batch.input_ids, batch.keep_mask, batch.answer_mask, strict=True):
        kept = tok.decode(ids[keep].tolist())
        answered = tok.decode(ids[1:][answer[:-1]].tolist())  # the answer tokens (targets of the masked positions)
        assert any(value.strip() and value.strip() in kept for value in answered.split("\n")), (kept, answered)
    many = next(batches(stream, tok, seq_len=900, batch_size=4, seed=1, fact_fraction=1.0, fact_counts=(4,)))
    for keep, answer in zip(many.keep_mask, many.answer_mask, strict=True):  # 4 values kept, 1 to 4 of them asked
        assert int((keep[1:] & ~keep[:-1]).sum()) + int(keep[0]) >= 2 and answer.any()
    with pytest.raises(ValueError, match="fact counts"):
        next(batches(stream, tok, seq_len=600, batch_size=1, seed=0, fact_fraction=1.0, fact_counts=(0,)))
    recurring = RecurringTokens(stream, tok, common=0)
    positions = recurring.positions(stream, min_distance=256)
    assert positions and all(tok.decode([stream[p]]).isupper() or tok.decode([stream[p]]).isdigit() for p in positions)
    out = tmp_path / "run"
    settings = ("--phase1-steps", "0", "--phase2-steps", "2", "--fact-fraction", "0.5", "--retrieval-fraction", "0.2",
                "--fact-counts", "2", "5")  # fmt: skip
    assert _train(out, *settings, "--recurring-keep") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["gate"] > 0 for r in log)
    from coda_gqa_l.models.weights import read_coda_meta

    training = read_coda_meta(out / "coda.safetensors")["training"]
    assert training["fact_fraction"] == 0.5 and training["recurring_keep"] is True and training["fact_counts"] == [2, 5]


def test_distillation_to_the_original_model(tmp_path: Path) -> None:
    """--distill-weight: a KL loss to the unconverted model's predictions on every non-answer token.
    It is zero when the student predicts as the teacher does, positive otherwise, and a run logs it
    and records its weight in the weights file."""
    from coda_gqa_l.training.distillation import distillation_loss

    teacher, _ = tiny_llama()
    teacher.eval()
    ids = torch.randint(0, 200, (2, 40))
    scored = torch.ones(2, 40, dtype=torch.bool)
    scored[1] = False  # a row with nothing scored adds nothing
    with torch.no_grad():
        same = teacher(input_ids=ids).logits
    assert float(distillation_loss(same, ids, scored, teacher)) == pytest.approx(0.0, abs=1e-5)
    other = same + torch.randn_like(same)
    assert float(distillation_loss(other, ids, scored, teacher)) > 0.01
    assert float(distillation_loss(other, ids, torch.zeros_like(scored), teacher)) == 0.0
    out = tmp_path / "run"
    settings = ("--phase1-steps", "0", "--phase2-steps", "2", "--fact-fraction", "0.5", "--distill-weight", "0.5")
    assert _train(out, *settings) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["distill"] > 0 for r in log)
    from coda_gqa_l.models.weights import read_coda_meta

    assert read_coda_meta(out / "coda.safetensors")["training"]["distill_weight"] == 0.5


def test_the_lean_distillation_gradient_matches_autograd() -> None:
    """_TeacherKL keeps one row of probabilities at a time; its value and gradient are the plain formula's."""
    from coda_gqa_l.training.distillation import _TeacherKL

    torch.manual_seed(0)
    student = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, 11, dtype=torch.float64)
    scored = torch.rand(3, 7) > 0.3
    lean = _TeacherKL.apply(student, teacher, scored)
    (lean_grad,) = torch.autograd.grad(lean * 2.0, student)
    target = torch.log_softmax(teacher, -1)
    plain = (target.exp() * (target - torch.log_softmax(student, -1))).sum(-1)[scored].mean()
    (plain_grad,) = torch.autograd.grad(plain * 2.0, student)
    assert float(lean.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    torch.testing.assert_close(lean_grad, plain_grad)


def test_the_command_line_fills_the_config_a_script_builds_by_name() -> None:
    """coda-train's options are TrainConfig's fields with the same defaults; the "smoke" preset is the
    run tests/tiny_training.py asks for on the command line; the "facts" preset starts from the shipped
    file with its own thresholds (coda-train checks they match)."""
    from coda_gqa_l.models.weights import read_coda_meta
    from coda_gqa_l.training.cli import build_parser, parse_args
    from coda_gqa_l.training.train_config import TrainConfig

    assert parse_args([]) == TrainConfig()
    smoke = ["--tiny-model", "--config", "tiny", "--num-sink", "2", "--phase1-steps", "2", "--phase2-steps",
             "2", "--seq-len", "128", "--phase2-seq-len", "512", "--batch-size", "2", "--needle-distance",
             "256"]  # fmt: skip
    assert parse_args(smoke) == TrainConfig.preset("smoke")
    facts = TrainConfig.preset("facts")
    assert facts.init_weights is not None
    shipped = read_coda_meta(facts.init_weights)["convert"]["bounded"]
    assert {k: shipped[k] for k in ("tau_exact", "novelty", "match", "max_inserts")} == {
        name: float(value) if name != "max_inserts" else int(value)
        for name, value in (item.split("=") for item in facts.routing)
    }
    namespace = build_parser().parse_args([])
    namespace.unknown_option = 1
    with pytest.raises(ValueError, match="unknown_option"):
        TrainConfig.from_namespace(namespace)
    with pytest.raises(ValueError, match="unknown TrainConfig preset"):
        TrainConfig.preset("huge")
    with pytest.raises(ValueError, match="value-first-share"):
        TrainConfig(value_first_share=2.0).check()
    with pytest.raises(ValueError, match="--value-first-keep must be one of value, after"):
        TrainConfig(value_first_keep="before").check()


def test_coda_train_refuses_to_train_weights_its_file_cannot_hold(capsys: pytest.CaptureFixture[str]) -> None:
    """``--trainable all`` would train the base model, and the CoDA weights file would drop it at the end."""
    from coda_gqa_l.training.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--trainable", "all"])
    assert exit_info.value.code == 2 and "invalid choice: 'all'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--value-first-share", "1.5"])
    assert "--value-first-share must be between 0 and 1, got 1.5" in capsys.readouterr().err
    assert parse_args(["--value-first-share", "0.1"]).value_first_share == 0.1
    assert parse_args(["--value-first-keep", "after"]).value_first_keep == "after"
    with pytest.raises(SystemExit):
        parse_args(["--value-first-keep", "before"])
    assert "invalid choice: 'before'" in capsys.readouterr().err
