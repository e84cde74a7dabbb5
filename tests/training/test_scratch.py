"""From-scratch training (coda-scratch): same start and same data for every variant, bits per
byte, and data parallel runs under torchrun (gloo, 2 CPU processes) that match one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coda_gqa_l.data.token_corpus import (
    TokenCorpus,
    TokenCorpusError,
    load_token_corpus,
    read_token_corpus,
    token_cache_path,
    write_token_corpus,
)
from coda_gqa_l.training.distributed import Cluster
from coda_gqa_l.training.scratch import build_parser, parse_args
from coda_gqa_l.training.scratch_config import ScratchConfig
from coda_gqa_l.training.scratch_model import build_model
from coda_gqa_l.training.scratch_trainer import batch_starts, rows_of_rank

SMALL = ["--tokenizer", "bytes", "--depth", "2", "--width", "64", "--heads", "4", "--kv-heads", "2",
         "--ffn", "128", "--seq-len", "256", "--global-batch", "4", "--val-tokens", "2048", "--config", "tiny",
         "--num-sink", "2"]  # fmt: skip


@pytest.fixture()
def token_cache(tmp_path: Path) -> Path:
    """A byte-token corpus in a temporary cache (random words), so no corpus is fetched."""
    rng = torch.Generator().manual_seed(0)
    words = [w.encode() for w in "alpha beta gamma delta river stone cloud paper".split()]
    text = b" ".join(words[i] for i in torch.randint(0, len(words), (20_000,), generator=rng).tolist())
    ids = torch.tensor(list(text), dtype=torch.int32)
    corpus = TokenCorpus(ids[:-16384], ids[-16384:-8192], ids[-8192:], "bytes", 257, 1.0)
    write_token_corpus(corpus, token_cache_path("bytes", ("wikipedia", "bible"), tmp_path))
    return tmp_path


def _args(*extra: str) -> ScratchConfig:
    return parse_args([*SMALL, "--max-steps", "1", *extra])


def test_the_command_line_fills_the_config_a_benchmark_builds_by_name() -> None:
    """coda-scratch's options are ScratchConfig's fields with the same defaults, and the "smoke" preset
    is the small model these tests use on the command line: a benchmark and the CLI build the same run."""
    assert parse_args(["--max-steps", "1"]) == ScratchConfig(max_steps=1)
    assert _args() == ScratchConfig.preset("smoke", max_steps=1)
    namespace = build_parser().parse_args([])
    namespace.unknown_option = 1
    with pytest.raises(ValueError, match="unknown_option"):
        ScratchConfig.from_namespace(namespace)
    with pytest.raises(ValueError, match="give a budget"):
        ScratchConfig().check()
    with pytest.raises(ValueError, match="do not divide"):
        ScratchConfig.preset("smoke", heads=3).check()
    model = build_model(ScratchConfig.preset("smoke", max_steps=None), 257)  # a model needs no budget
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ValueError, match="unknown ScratchConfig preset"):
        ScratchConfig.preset("huge")
    with pytest.raises(SystemExit):  # the command line says why and exits
        parse_args(["--depth", "2"])


def test_every_variant_starts_from_the_same_weights() -> None:
    models = {a: build_model(_args("--attention", a), 257) for a in ("gqa", "coda", "coda-bounded")}
    shared = dict(models["gqa"].named_parameters())
    for name, model in models.items():
        params = dict(model.named_parameters())
        assert params.keys() >= shared.keys(), name
        for key, value in shared.items():
            torch.testing.assert_close(params[key], value, msg=f"{name}: {key}")
    assert len(dict(models["coda"].named_parameters())) > len(shared)  # theta, lambda, head norm


def test_batches_depend_on_seed_and_step_only_and_shard_by_rank() -> None:
    first = batch_starts(10_000, 128, 8, seed=3, step=5)
    assert torch.equal(first, batch_starts(10_000, 128, 8, seed=3, step=5))
    assert not torch.equal(first, batch_starts(10_000, 128, 8, seed=3, step=6))
    ranks = [rows_of_rank(first, Cluster(r, 2, r, torch.device("cpu"))) for r in range(2)]
    assert sorted(torch.cat(ranks).tolist()) == sorted(first.tolist())
    with pytest.raises(ValueError, match="not divisible"):
        rows_of_rank(first[:7], Cluster(0, 2, 0, torch.device("cpu")))


def test_bits_per_byte_and_token_cache_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coda_gqa_l.data import token_corpus as token_data

    zeros = torch.zeros(4, dtype=torch.int32)
    corpus = TokenCorpus(zeros, zeros, zeros, "bytes", 257, 2.0)
    assert math.isclose(corpus.bits_per_byte(math.log(2)), 0.5)
    path = token_cache_path("bytes", ("wikipedia", "bible"), tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    with pytest.raises(TokenCorpusError, match="not a readable token cache"):
        read_token_corpus(path, "bytes")
    rebuilt = []
    monkeypatch.setattr(token_data, "build_token_corpus", lambda *a: rebuilt.append(a) or corpus)
    assert load_token_corpus("bytes", cache_dir=tmp_path) is corpus and rebuilt  # a broken cache is rebuilt
    assert read_token_corpus(path, "bytes").val_bytes_per_token == 2.0
    with pytest.raises(TokenCorpusError, match="'bytes' tokens"):
        read_token_corpus(path, "smollm2")


def test_a_bounded_run_whose_sequences_fit_the_window_is_refused() -> None:
    with pytest.raises(ValueError, match="never be written"):
        build_model(_args("--attention", "coda-bounded", "--seq-len", "128"), 257)


FSDP_EXIT_ABORT = "terminate called without an active exception"


def _run(out: Path, cache: Path, processes: int, *extra: str) -> list[dict]:
    command = [sys.executable, "-m", "coda_gqa_l.training.scratch"]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(29600 + os.getpid() % 200), "-m", "coda_gqa_l.training.scratch"]  # fmt: skip
    command += [*SMALL, "--max-steps", "3", "--eval-every", "3", "--cache-dir", str(cache), "--out", str(out), *extra]
    for _attempt in range(2):
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        # Gloo's FSDP teardown on the CPU can abort a rank as the process exits, after the run has finished
        # (pytorch/pytorch#90549; once in three CI runs on 2026-12-04): that one failure is run again once
        if done.returncode == 0 or FSDP_EXIT_ABORT not in done.stderr:
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(
    tmp_path: Path, token_cache: Path, parallel: list[str]
) -> None:
    one = _run(tmp_path / "one", token_cache, 1, "--attention", "coda-bounded")
    two = _run(tmp_path / "two", token_cache, 2, "--attention", "coda-bounded", *parallel)
    assert len(two) == len(one) == 3  # rank 0 alone writes the log
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
    assert math.isclose(one[-1]["val_bpb"], two[-1]["val_bpb"], rel_tol=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallel"] == ("fsdp" if parallel else "ddp")
    assert summary["tokens"] == 3 * 4 * 256 and summary["tokens_per_s"] > 0
    assert (tmp_path / "two" / "checkpoint.safetensors").stat().st_size > 0


def test_coda_train_from_scratch_runs_in_process(tmp_path: Path, token_cache: Path) -> None:
    from coda_gqa_l.training.cli import main

    out = tmp_path / "run"
    assert main(["--from-scratch", *SMALL, "--attention", "gqa", "--max-steps", "2", "--eval-every", "1",
                 "--cache-dir", str(token_cache), "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attention"] == "gqa" and summary["steps"] == 2 and len(summary["evaluations"]) == 2
    assert 0 < summary["final"]["val_bpb"] < 9  # a random byte model starts near log2(257) bits


@pytest.mark.slow
def test_scratch_compare_benchmark_writes_its_tables_and_plot(tmp_path: Path, token_cache: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "scratch_compare.py"
    first, out = tmp_path / "first", tmp_path / "compare"
    common = [sys.executable, str(script), "--token-budget", "2048", "--warmup-steps", "1", *SMALL,
              "--eval-every", "1", "--cache-dir", str(token_cache)]  # fmt: skip
    done = subprocess.run([*common, "--seeds", "0", "--out", str(first)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    earlier = json.loads((first / "scratch_compare.json").read_text())["runs"]
    # a second call goes on from the first one's JSON: seed 0's runs are kept, not repeated
    command = [*common, "--seeds", "0", "1", "--time-budget", "0.5", "--out", str(out)]
    command += ["--resume", str(first / "scratch_compare.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "scratch_compare.json").read_text())
    assert len(result["runs"]) == 3 * 2 + 3
    assert result["runs"][:3] == earlier
    rows = {(r["mode"], r["variant"]): r for r in result["aggregate"]}
    assert rows[("equal tokens", "gqa")]["runs"] == 2 and rows[("equal tokens", "gqa")]["flop_ideal_ratio"] == 1.0
    assert rows[("equal tokens", "coda")]["flop_ideal_ratio"] > 1.0
    assert rows[("equal wall-clock", "gqa")]["step_ratio_vs_gqa"] == 1.0
    assert all(r["tokens"] == 2048 for r in result["runs"] if r["mode"] == "equal tokens")
    assert "| equal wall-clock | coda-bounded |" in (out / "scratch_compare.md").read_text()
    assert (out / "scratch_compare.png").stat().st_size > 0


@pytest.mark.slow
def test_scratch_scaling_benchmark_compares_one_and_two_processes(tmp_path: Path, token_cache: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "scratch_scaling.py"
    out = tmp_path / "scaling"
    command = [sys.executable, str(script), "--processes", "2", "--port", str(29800 + os.getpid() % 100),
               "--out", str(out), "--", *SMALL, "--attention", "coda", "--max-steps", "3"]  # fmt: skip
    command += ["--eval-every", "3", "--cache-dir", str(token_cache)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "scratch_scaling.json").read_text())
    assert result["curves"]["updates"] == 3 and result["curves"]["max_rel_loss_diff"] < 1e-4
    assert result["many"]["processes"] == 2 and result["tokens_per_s_ratio"] > 0
    assert (out / "scratch_scaling.png").stat().st_size > 0


def test_retrieval_rows_are_the_same_for_any_process_count() -> None:
    from coda_gqa_l.models.tokenizer import ByteTokenizer
    from coda_gqa_l.training.scratch_retrieval import RetrievalSource, mix_retrieval

    filler = list((" ".join(["river stone cloud paper"] * 400)).encode())
    source = RetrievalSource(ByteTokenizer(), filler, 0.5, 256, seed=0)
    rows = torch.zeros(4, 769, dtype=torch.long)
    whole = mix_retrieval(rows, [0, 1, 2, 3], step=7, source=source)
    assert 0 < int((whole != 0).any(1).sum()) < 4  # some rows became documents
    halves = [mix_retrieval(rows[r::2], [r, r + 2], step=7, source=source) for r in range(2)]
    assert torch.equal(torch.stack([halves[0][0], halves[1][0], halves[0][1], halves[1][1]]), whole)


def test_scratch_run_with_retrieval_reports_passkey_accuracy(tmp_path: Path, token_cache: Path) -> None:
    from coda_gqa_l.training.scratch import main

    out = tmp_path / "run"
    argv = [*SMALL, "--seq-len", "768", "--attention", "coda-bounded", "--max-steps", "2", "--retrieval-fraction",
            "0.5", "--passkey-trials", "2", "--passkey-depths", "0.1"]  # fmt: skip
    argv += ["--cache-dir", str(token_cache), "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    (cell,) = summary["passkey"]
    assert cell["length"] == 768 and cell["trials"] == 2 and cell["min_needle_distance"] >= 256


@pytest.mark.slow
def test_smollm2_tokenizer_is_kept_beside_the_token_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coda_gqa_l.data.token_corpus import load_tokenizer
    from coda_gqa_l.models import loader

    real = loader.load_smollm2_tokenizer()  # the packaged model's export, in the default cache
    calls = []
    monkeypatch.setattr(loader, "load_smollm2_tokenizer", lambda cache_dir=None: calls.append(cache_dir) or real)
    first = load_tokenizer("smollm2", tmp_path)
    again = load_tokenizer("smollm2", tmp_path)  # from the copy: the model is not asked again
    assert len(calls) == 1 and (tmp_path / "tokens" / "smollm2-tokenizer" / "tokenizer.json").is_file()
    text = "The pass key for the vault is 48213."
    assert again.encode(text, add_special_tokens=False) == first.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_compiled_training_gives_the_eager_losses(tmp_path: Path, token_cache: Path) -> None:
    from coda_gqa_l.training.scratch import main

    logs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        argv = [*SMALL, "--attention", "coda", "--max-steps", "2", "--cache-dir", str(token_cache), "--out", str(out)]
        assert main([*argv, *extra]) == 0
        logs[name] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logs["compiled"] == pytest.approx(logs["eager"], rel=1e-4)


@pytest.mark.slow
def test_a_time_budget_stops_every_process_at_the_same_update(tmp_path: Path, token_cache: Path) -> None:
    log = _run(tmp_path / "two", token_cache, 2, "--attention", "gqa", "--max-steps", "100000", "--time-budget", "1")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == len(log) > 1 and summary["trained_s"] >= 1.0  # no rank left waiting: it ended
