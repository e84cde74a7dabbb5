"""``coda-scratch`` (also ``coda-train --from-scratch``): train a small Llama from random weights
with plain GQA, unbounded CoDA or bounded CoDA attention for a fixed budget (docs/training.md).

Every variant starts from the same initial weights (the base is drawn before conversion, which
adds its own parameters from a separate generator) and sees the same batches in the same order
(one seeded sampler), so runs differ in attention alone. The budget is wall-clock seconds of
training (``--time-budget``, evaluation excluded), tokens (``--token-budget``), or both (whichever
ends first); the learning rate warms up, then follows a cosine over the budget's progress.
Validation is bits per byte on the held-out Wikipedia text. Under ``torchrun`` the run is data
parallel (DDP, or ``--fsdp``); rank 0 writes ``OUT/log.jsonl``, ``OUT/summary.json`` and the
checkpoint.

    coda-scratch --attention coda --time-budget 600 --out runs/scratch-coda
    torchrun --nproc_per_node 2 -m coda_gqa_l.training.scratch --attention gqa --out runs/gqa-2gpu
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cli_help import HelpFormatter, first_paragraph
from ..config import BoundedConfig
from ..data.token_corpus import TOKENIZERS, TokenCorpus, load_token_corpus, load_tokenizer
from ..kernels.dispatch import backend, unbounded_path
from ..models.convert import convert
from . import distributed
from .checkpoint import write_checkpoint
from .distributed import Cluster
from .scratch_retrieval import RetrievalSource, mix_retrieval, passkey_accuracy

ATTENTIONS = ("gqa", "coda", "coda-bounded")
CHECKPOINT = "checkpoint.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coda-scratch", description=first_paragraph(__doc__), formatter_class=HelpFormatter
    )
    attention_help = "gqa: plain attention; coda: differential; coda-bounded: differential with the fixed-size state"
    p.add_argument("--attention", default="coda", choices=ATTENTIONS, help=attention_help)
    p.add_argument("--depth", type=int, default=8, help="decoder layers")
    p.add_argument("--width", type=int, default=512, help="hidden size")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--ffn", type=int, default=1408, help="SwiGLU inner size")
    p.add_argument("--seq-len", type=int, default=1024, help="training sequence length")
    p.add_argument("--config", default="medium", help="bounded preset of coda-bounded")
    p.add_argument("--num-sink", type=int, default=4, help="sinks taken out of the exact bank")
    p.add_argument("--lambda-init", type=float, default=0.5, help="CoDA's lambda at the start (from scratch)")
    p.add_argument("--tokenizer", default="smollm2", choices=TOKENIZERS, help="SmolLM2's (packaged) or UTF-8 bytes")
    p.add_argument("--global-batch", type=int, default=32, help="sequences per update, over all processes")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward per process (default: the whole per-process batch)",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, as a share of --lr")
    p.add_argument("--warmup", type=int, default=50, help="updates of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds of training, evaluation excluded (one of the three budgets; default: none)",
    )
    p.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help="training tokens over all processes (one of the three budgets; default: none)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="updates (one of the three budgets; default: none)")
    p.add_argument("--eval-every", type=int, default=100, help="updates between validations")
    p.add_argument("--val-tokens", type=int, default=131072, help="held-out tokens per validation")
    p.add_argument(
        "--retrieval-fraction",
        type=float,
        default=0.0,
        help="training rows that are passkey documents (key >= 2 bounded windows before the question)",
    )
    p.add_argument("--passkey-trials", type=int, default=0, help="passkey test after training: trials per cell")
    p.add_argument(
        "--passkey-lengths", nargs="+", type=int, default=None, help="pass-key document lengths (default: --seq-len)"
    )
    p.add_argument("--passkey-depths", nargs="+", type=float, default=[0.1, 0.4], help="where the key sits")
    p.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state (FSDP2)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument("--out", type=Path, default=Path("runs/coda-scratch"), help="folder for the log and summary")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where corpora and token caches live (default: $CODA_GQA_L_CACHE, else the user cache folder)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.time_budget is None and args.token_budget is None and args.max_steps is None:
        p.error("give a budget: --time-budget, --token-budget or --max-steps")
    return args


# --- the model ------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, vocab_size: int) -> nn.Module:
    """A random Llama of the requested shape, its attention converted to the chosen variant."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.width % args.heads or args.heads % args.kv_heads:
        raise ValueError(f"--width {args.width}, --heads {args.heads}, --kv-heads {args.kv_heads} do not divide")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.width,
        intermediate_size=args.ffn,
        num_hidden_layers=args.depth,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(config)
    lam = min(max(args.lambda_init, 1e-4), 1 - 1e-4)
    bias = math.log(lam / (1 - lam))
    if args.attention == "gqa":
        convert(model, None, differential=False)
    else:  # from scratch: a normed head and a lambda well away from 0, as differential transformers train
        bounded = BoundedConfig.preset(args.config, num_sink=args.num_sink)
        if args.attention == "coda-bounded" and args.seq_len <= bounded.window:
            fits = f"--seq-len {args.seq_len} fits in the {args.config} window ({bounded.window})"
            raise ValueError(f"{fits}: the banks would never be written; use a longer sequence or a smaller --config")
        convert(model, bounded if args.attention == "coda-bounded" else None, head_norm="rms", lambda_init_bias=bias)
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()  # type: ignore[operator]
    return {"total": total, "non_embedding": total - embedding}


# --- data -----------------------------------------------------------------------------------


def batch_starts(corpus_len: int, seq_len: int, global_batch: int, seed: int, step: int) -> Tensor:
    """Window starts of update ``step``'s global batch: a function of (seed, step) alone, so every
    variant and every process count sees the same sequences in the same order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, corpus_len - seq_len - 1, (global_batch,), generator=generator)


def rows_of_rank(starts: Tensor, cluster: Cluster) -> Tensor:
    if len(starts) % cluster.world:
        raise ValueError(f"--global-batch {len(starts)} is not divisible by {cluster.world} processes")
    return starts[cluster.rank :: cluster.world]


def windows(stream: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    offsets = torch.arange(seq_len + 1)
    return stream[starts[:, None] + offsets].long()


# --- training -------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run the training; the summary on rank 0, None on the other ranks."""
    with distributed.session(args.device) as cluster:
        summary = _train(args, cluster)
    return summary if cluster.is_main else None


def _train(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    from tqdm import tqdm

    corpus = _corpus(args, cluster)
    model = build_model(args, corpus.vocab_size).to(cluster.device)
    counts = parameter_counts(model)
    wrapped = distributed.wrap(model, cluster, fsdp=args.fsdp)
    runner: nn.Module = torch.compile(wrapped) if args.compile else wrapped  # type: ignore[assignment]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=cluster.device.type == "cuda",
    )  # fmt: skip
    local = args.global_batch // cluster.world
    micro = min(args.micro_batch or local, local)
    if local % micro:
        raise ValueError(f"--micro-batch {micro} does not divide the {local} sequences each process gets")
    autocast = cluster.device.type == "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "log.jsonl"
    if cluster.is_main:
        log_path.write_text("")
    tokens_per_step = args.global_batch * args.seq_len
    window = BoundedConfig.preset(args.config, num_sink=args.num_sink).window
    tokenizer = (
        load_tokenizer(args.tokenizer, args.cache_dir) if args.retrieval_fraction or args.passkey_trials else None
    )
    filler = corpus.train.tolist() if args.retrieval_fraction else []
    retrieval = RetrievalSource(tokenizer, filler, args.retrieval_fraction, 2 * window, args.seed)
    step, tokens, trained_s, step_times = 0, 0, 0.0, []
    bar = tqdm(desc=f"{args.attention} x{cluster.world}", unit="step", disable=not cluster.is_main)
    evaluations: list[dict[str, Any]] = []
    while not _budget_spent(args, step, tokens, trained_s):
        progress = _progress(args, step, tokens, trained_s)
        lr = _learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = batch_starts(len(corpus.train), args.seq_len, args.global_batch, args.seed, step)
        rows = windows(corpus.train, rows_of_rank(starts, cluster), args.seq_len)
        rows = mix_retrieval(rows, list(range(cluster.rank, args.global_batch, cluster.world)), step, retrieval)
        _synchronize(cluster)
        began = time.perf_counter()  # step time: compute only, the batch is ready
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=cluster.device)
        for index in range(0, local, micro):
            piece = rows[index : index + micro].to(cluster.device)
            with distributed.gradient_sync(wrapped, enabled=index + micro >= local):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    logits = runner(input_ids=piece[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), piece[:, 1:].flatten())
                (loss * (len(piece) / local)).backward()
            loss_sum += loss.detach() * len(piece)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _synchronize(cluster)
        # the ranks' mean step time: every rank then sees the same clock and stops at the same update
        local_seconds = time.perf_counter() - began
        total_loss, seconds = distributed.all_sum([float(loss_sum) / args.global_batch,
                                                   local_seconds / cluster.world], cluster)  # fmt: skip
        trained_s += seconds
        step_times.append(seconds)
        step += 1
        tokens += tokens_per_step
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"training loss is {total_loss} at update {step}: lower --lr")
        grad_norm = float(distributed.full_tensor(norm))
        record = {"step": step, "tokens": tokens, "loss": total_loss, "lr": lr, "grad_norm": grad_norm,
                  "step_s": seconds, "trained_s": trained_s}  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
        if step % args.eval_every == 0 or _budget_spent(args, step, tokens, trained_s):
            evaluation = validate(runner, corpus, args, cluster)
            evaluations.append({"step": step, "tokens": tokens, "trained_s": trained_s, **evaluation})
            record.update(evaluation)
        if cluster.is_main:
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
    bar.close()
    summary = _summary(args, cluster, counts, step, tokens, trained_s, step_times, evaluations, corpus)
    if args.passkey_trials:  # every rank runs the same documents (FSDP needs all ranks in each forward)
        summary["passkey"] = passkey_accuracy(
            model, tokenizer, corpus.hay.tolist(), lengths=args.passkey_lengths or [args.seq_len],
            depths=args.passkey_depths, trials=args.passkey_trials, min_distance=2 * window,
            batch=max(1, args.micro_batch or args.global_batch // cluster.world), device=cluster.device,
        )  # fmt: skip
    _save(model, optimizer, args, cluster, summary)
    return summary


@torch.no_grad()
def validate(model: nn.Module, corpus: TokenCorpus, args: argparse.Namespace, cluster: Cluster) -> dict[str, float]:
    """Loss (nats per token) and bits per byte on the first ``--val-tokens`` held-out tokens, cut into
    ``--seq-len`` windows shared out over the processes."""
    count = min(args.val_tokens, len(corpus.val) - 1) // args.seq_len
    count -= count % cluster.world  # the same number of forwards on every rank (FSDP needs all of them)
    if count == 0:
        raise ValueError(f"the validation text has {len(corpus.val)} tokens, fewer than --seq-len {args.seq_len}")
    starts = torch.arange(count) * args.seq_len
    mine = starts[cluster.rank :: cluster.world]
    was_training = model.training
    model.eval()
    nll, scored = 0.0, 0.0
    batch = max(1, (args.micro_batch or args.global_batch // cluster.world))
    for index in range(0, len(mine), batch):
        rows = windows(corpus.val, mine[index : index + batch], args.seq_len).to(cluster.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cluster.device.type == "cuda"):
            logits = model(input_ids=rows[:, :-1], use_cache=False).logits
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
        scored += rows[:, 1:].numel()
    nll, scored = distributed.all_sum([nll, float(scored)], cluster)
    model.train(was_training)
    loss = nll / scored
    return {"val_loss": loss, "val_bpb": corpus.bits_per_byte(loss)}


def _corpus(args: argparse.Namespace, cluster: Cluster) -> TokenCorpus:
    # rank 0 builds the token cache first; the others then read it (no two writers)
    if cluster.is_main:
        corpus = load_token_corpus(args.tokenizer, cache_dir=args.cache_dir)
    if cluster.distributed:
        torch.distributed.barrier()
    if not cluster.is_main:
        corpus = load_token_corpus(args.tokenizer, cache_dir=args.cache_dir)
    return corpus


def _budget_spent(args: argparse.Namespace, step: int, tokens: int, trained_s: float) -> bool:
    return (
        (args.max_steps is not None and step >= args.max_steps)
        or (args.token_budget is not None and tokens >= args.token_budget)
        or (args.time_budget is not None and trained_s >= args.time_budget)
    )


def _progress(args: argparse.Namespace, step: int, tokens: int, trained_s: float) -> float:
    """How much of the budget is used, 0..1 (the largest of the budgets given)."""
    parts = [0.0]
    if args.max_steps:
        parts.append(step / args.max_steps)
    if args.token_budget:
        parts.append(tokens / args.token_budget)
    if args.time_budget:
        parts.append(trained_s / args.time_budget)
    return min(1.0, max(parts))


def _learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _synchronize(cluster: Cluster) -> None:
    if cluster.device.type == "cuda":
        torch.cuda.synchronize(cluster.device)


def _summary(args: argparse.Namespace, cluster: Cluster, counts: dict[str, int], step: int, tokens: int,
             trained_s: float, step_times: list[float], evaluations: list[dict[str, Any]],
             corpus: TokenCorpus) -> dict[str, Any]:  # fmt: skip
    steady = step_times[min(len(step_times) - 1, 10) :] if step_times else [math.nan]  # the first steps compile
    median = statistics.median(steady)
    return {
        "attention": args.attention,
        "model": {"depth": args.depth, "width": args.width, "heads": args.heads, "kv_heads": args.kv_heads,
                  "ffn": args.ffn, "seq_len": args.seq_len, "vocab": corpus.vocab_size, "parameters": counts},
        "bounded_config": args.config if args.attention == "coda-bounded" else None,
        "processes": cluster.world,
        "parallel": ("fsdp" if args.fsdp else "ddp") if cluster.distributed else "none",
        "device": torch.cuda.get_device_name(cluster.device) if cluster.device.type == "cuda" else "cpu",
        "kernels": {"backend": backend(cluster.device), "unbounded": unbounded_path()},
        "global_batch": args.global_batch,
        "seed": args.seed,
        "steps": step,
        "tokens": tokens,
        "trained_s": trained_s,
        "median_step_s": median,
        "tokens_per_s": args.global_batch * args.seq_len / median,
        "final": evaluations[-1] if evaluations else None,
        "evaluations": evaluations,
        "budget": {"time_s": args.time_budget, "tokens": args.token_budget, "steps": args.max_steps},
        "command": "coda-scratch " + " ".join(_argv()),
    }  # fmt: skip


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def _save(model: nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace, cluster: Cluster,
          summary: dict[str, Any]) -> None:  # fmt: skip
    """Rank 0 writes the summary and a checkpoint of all weights and AdamW state; sharded (FSDP)
    tensors are gathered first, which every rank takes part in."""
    params, states = {}, {}
    for name, param in model.named_parameters():
        params[name] = distributed.full_tensor(param.detach())
        entry = optimizer.state.get(param, {})
        states[name] = {k: distributed.full_tensor(v) if torch.is_tensor(v) else v for k, v in entry.items()}
    if cluster.is_main:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        meta = {"kind": "scratch", "step": summary["steps"], "args": {k: str(v) for k, v in vars(args).items()}}
        write_checkpoint(args.out / CHECKPOINT, params, states, meta)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = train(args)
    if summary is not None:  # rank 0
        final = summary["final"] or {}
        print(
            f"coda-scratch: {summary['attention']} x{summary['processes']}: {summary['steps']} updates, "
            f"{summary['tokens']:,} tokens in {summary['trained_s']:.1f} s ({summary['tokens_per_s']:,.0f} tok/s, "
            f"median step {summary['median_step_s'] * 1000:.1f} ms); val bpb {final.get('val_bpb', float('nan')):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
