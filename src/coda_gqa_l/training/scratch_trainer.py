"""Training of a from-scratch run (``ScratchConfig``): the same batches in the same order for every
variant (one seeded sampler), a budget of wall-clock seconds, tokens or updates (whichever ends
first), warm-up then a cosine over the budget's progress, validation in bits per byte on held-out
Wikipedia, and data parallel runs under ``torchrun`` (DDP, or FSDP2 with ``fsdp``); rank 0 writes
``OUT/log.jsonl``, ``OUT/summary.json`` and the checkpoint (docs/training.md section 4).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BoundedConfig
from ..data.token_corpus import TokenCorpus, load_token_corpus, load_tokenizer
from ..kernels.dispatch import backend, unbounded_path
from . import distributed
from .checkpoint import write_checkpoint
from .distributed import Cluster
from .scratch_config import ScratchConfig
from .scratch_model import build_model, parameter_counts
from .scratch_retrieval import RetrievalSource, mix_retrieval, passkey_accuracy

CHECKPOINT = "checkpoint.safetensors"


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


def train(args: ScratchConfig, command: str | None = None) -> dict[str, Any] | None:
    """Run the training; the summary on rank 0, None on the other ranks. ``command``: the command
    line that asked for it, recorded in the summary (a benchmark that builds the config passes
    none)."""
    args.check()
    with distributed.session(args.device) as cluster:
        summary = _train(args, cluster, command)
    return summary if cluster.is_main else None


def _train(args: ScratchConfig, cluster: Cluster, command: str | None) -> dict[str, Any]:
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
    summary = _summary(args, cluster, counts, step, tokens, trained_s, step_times, evaluations, corpus, command)
    if args.passkey_trials:  # every rank runs the same documents (FSDP needs all ranks in each forward)
        summary["passkey"] = passkey_accuracy(
            model, tokenizer, corpus.hay.tolist(), lengths=args.passkey_lengths or [args.seq_len],
            depths=args.passkey_depths, trials=args.passkey_trials, min_distance=2 * window,
            batch=max(1, args.micro_batch or args.global_batch // cluster.world), device=cluster.device,
        )  # fmt: skip
    _save(model, optimizer, args, cluster, summary)
    return summary


@torch.no_grad()
def validate(model: nn.Module, corpus: TokenCorpus, args: ScratchConfig, cluster: Cluster) -> dict[str, float]:
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


def _corpus(args: ScratchConfig, cluster: Cluster) -> TokenCorpus:
    # rank 0 builds the token cache first; the others then read it (no two writers)
    if cluster.is_main:
        corpus = load_token_corpus(args.tokenizer, cache_dir=args.cache_dir)
    if cluster.distributed:
        torch.distributed.barrier()
    if not cluster.is_main:
        corpus = load_token_corpus(args.tokenizer, cache_dir=args.cache_dir)
    return corpus


def _budget_spent(args: ScratchConfig, step: int, tokens: int, trained_s: float) -> bool:
    return (
        (args.max_steps is not None and step >= args.max_steps)
        or (args.token_budget is not None and tokens >= args.token_budget)
        or (args.time_budget is not None and trained_s >= args.time_budget)
    )


def _progress(args: ScratchConfig, step: int, tokens: int, trained_s: float) -> float:
    """How much of the budget is used, 0..1 (the largest of the budgets given)."""
    parts = [0.0]
    if args.max_steps:
        parts.append(step / args.max_steps)
    if args.token_budget:
        parts.append(tokens / args.token_budget)
    if args.time_budget:
        parts.append(trained_s / args.time_budget)
    return min(1.0, max(parts))


def _learning_rate(args: ScratchConfig, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _synchronize(cluster: Cluster) -> None:
    if cluster.device.type == "cuda":
        torch.cuda.synchronize(cluster.device)


def _summary(args: ScratchConfig, cluster: Cluster, counts: dict[str, int], step: int, tokens: int,
             trained_s: float, step_times: list[float], evaluations: list[dict[str, Any]],
             corpus: TokenCorpus, command: str | None) -> dict[str, Any]:  # fmt: skip
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
        "config": args.as_record(),
        "command": command,
    }  # fmt: skip


def _save(model: nn.Module, optimizer: torch.optim.Optimizer, args: ScratchConfig, cluster: Cluster,
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
        meta = {"kind": "scratch", "step": summary["steps"], "args": args.as_record()}
        write_checkpoint(args.out / CHECKPOINT, params, states, meta)
