"""Two-phase training of a converted model (``coda-train``; docs/training.md), from a ``TrainConfig``.

Phase 1 trains unbounded differential attention (full cache); phase 2 switches every layer to
the bounded state (``to_bounded``) and trains through the bank writes, on text mixed with
retrieval and fact documents whose answer sits at least two windows before its question; a hinge
loss on the write gate teaches it to keep those answers and refuse other tokens
(training/gate_supervision.py), and an optional KL loss keeps general text close to the original
model (training/distillation.py). Each phase's steps count optimizer updates. A checkpoint
(trained parameters + AdamW state) is written every ``save_every`` steps and when ``time_budget``
runs out; ``resume`` continues from it. The end result is a CoDA weights file that
``apply_coda_weights`` loads on the base. Under ``torchrun`` it is data parallel (DDP): each
process draws its own batches, rank 0 logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BoundedConfig, parse_routing
from ..data import load_wikipedia
from ..data.tokens import token_stream
from ..data.training_rows import IGNORE, Batch, batches
from ..models.convert import convert, to_bounded
from ..models.loader import load_model
from ..models.lora import add_lora
from ..models.params import is_coda_parameter, select_trainable
from ..models.tiny import tiny_llama
from ..models.weights import WeightsFileError, apply_coda_weights, read_coda_meta, save_coda_weights
from . import distributed
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from .distillation import Distillation, distillation_loss
from .distributed import Cluster
from .gate_supervision import gate_hinge_loss, recorded_gate_logits
from .train_config import TrainConfig

CHECKPOINT = "checkpoint.safetensors"


class TrainingSetupError(ValueError):
    """Settings that cannot train together (thresholds, a checkpoint written with other settings);
    ``coda-train`` ends with its message, a script can catch it."""


def train(args: TrainConfig, cluster: Cluster | None = None) -> int:
    """Run the two phases (or what is left of them after ``resume``); 0 when done or stopped by the
    time budget with a checkpoint. Without a ``cluster`` it opens one on ``args.device`` (torchrun's
    processes when launched by it)."""
    args.check()
    if cluster is None:
        with distributed.session(args.device) as opened:
            return _train(args, opened)
    return _train(args, cluster)


def _train(args: TrainConfig, cluster: Cluster) -> int:
    began = time.monotonic()
    device = cluster.device
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / CHECKPOINT
    resume_meta = read_checkpoint_meta(checkpoint) if args.resume and checkpoint.exists() else None
    if args.resume and resume_meta is None and cluster.is_main:
        print(f"coda-train: no checkpoint at {checkpoint}; starting from the beginning", file=sys.stderr)
    if resume_meta is not None:
        _check_resumable(resume_meta, args, checkpoint)

    # the preset's differential flag follows --attention, as to_bounded sets it from the core: a GQA
    # weights file records differential=False and must compare equal when a run starts from it
    preset = BoundedConfig.preset(args.config, num_sink=args.num_sink)
    try:
        routing = parse_routing(args.routing)
        bounded = dataclasses.replace(preset, differential=args.attention == "coda", **routing)
    except ValueError as exc:
        raise TrainingSetupError(f"coda-train: {exc}") from None
    if args.gate_weight > 0 and not 0 < args.gate_drop < bounded.tau_exact < args.gate_keep < 1:
        raise TrainingSetupError(
            f"coda-train: need 0 < --gate-drop ({args.gate_drop}) < tau_exact ({bounded.tau_exact}) "
            f"< --gate-keep ({args.gate_keep}) < 1, or the hinge cannot separate kept from refused tokens"
        )
    model, tokenizer, base_name = _load(args)
    model.to(device)

    phase, step = (resume_meta["phase"], resume_meta["step"]) if resume_meta else (1, 0)
    if args.init_weights is not None and resume_meta is None:
        phase = _start_from_weights(model, args, bounded)
    else:
        convert(model, None, differential=args.attention == "coda")
        if args.trainable == "coda+lora":
            add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
        if phase == 2:
            to_bounded(model, bounded)
    stream = token_stream(_texts(args), tokenizer)
    # the teacher is the original model, unconverted and frozen: it reads the whole row with a full cache
    teacher = _teacher(args, device) if args.distill_weight > 0 else None
    log_path = args.out / "log.jsonl"
    while phase <= 2:
        steps = args.phase1_steps if phase == 1 else args.phase2_steps
        params = select_trainable(model, args.trainable)
        optimizer = torch.optim.AdamW(_param_groups(params, args), lr=args.lr, weight_decay=0.0)
        if resume_meta is not None and resume_meta["phase"] == phase:
            load_checkpoint(checkpoint, params, optimizer)
            resume_meta = None
        elif phase == 2 and step == 0 and cluster.is_main:
            # the switch to bounded is checkpointed: a resume never redoes phase 1
            save_checkpoint(checkpoint, params, optimizer, _meta(args, phase, step))
        runner = distributed.wrap(model, cluster)  # after select_trainable: DDP syncs what trains
        finished = _run_phase(runner, params, optimizer, phase, step, steps, stream, tokenizer, bounded, args,
                              cluster, log_path, checkpoint, began, teacher)  # fmt: skip
        if not finished:
            if cluster.is_main:
                print(f"coda-train: time budget reached; checkpoint at {checkpoint}; continue with --resume")
            if phase == 2 and cluster.is_main:  # usable weights of what was trained so far, marked as such
                _save_weights(model, args, base_name, device, completed=False)
            return 0
        # free the phase's DDP wrapper before the next is made: its gradient hooks sit on the shared
        # parameters for as long as it lives
        del runner
        gc.collect()
        if phase == 1:
            to_bounded(model, bounded)
        phase, step = phase + 1, 0
    if cluster.is_main:
        _save_weights(model, args, base_name, device, completed=True)
    return 0


def _save_weights(model: nn.Module, args: TrainConfig, base: str, device: torch.device, completed: bool) -> None:
    weights = args.weights or args.out / "coda.safetensors"
    log_path = args.out / "log.jsonl"
    steps = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    training = {
        "completed": completed,
        "updates": {f"phase{p}": max((r["step"] for r in steps if r["phase"] == p), default=0) for p in (1, 2)},
        "planned_updates": {"phase1": args.phase1_steps, "phase2": args.phase2_steps},
        "tokens_per_update": {
            "phase1": args.seq_len * args.batch_size * args.accum,
            "phase2": args.phase2_seq_len * args.batch_size * args.accum,
        },  # fmt: skip
        "attention": args.attention,
        "trainable": args.trainable,
        "lr": args.lr,
        "retrieval_fraction": args.retrieval_fraction,
        "fact_fraction": args.fact_fraction,
        "recurring_keep": args.recurring_keep,
        "fact_counts": args.fact_counts,
        "value_first_share": args.value_first_share,
        "value_first_keep": args.value_first_keep,
        "distill_weight": args.distill_weight,
        "gate_supervision": {
            "weight": args.gate_weight,
            "keep": args.gate_keep,
            "drop": args.gate_drop,
            "refuse": args.gate_refuse,
            "lr": args.gate_lr if args.gate_lr is not None else args.lr,
        },
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "elapsed_s_last_call": steps[-1]["elapsed_s"] if steps else 0.0,
    }
    if args.init_weights is not None:  # the updates above come on top of the starting file's own training
        training["started_from"] = _provenance(args.init_weights)
    save_coda_weights(model, weights, base=base, training=training)
    print(f"coda-train: wrote {weights}")


def _provenance(path: Path) -> dict[str, Any]:
    """The starting weights file's name and its own training record (nested, so a chain of
    continued runs keeps every step of its history)."""
    record: dict[str, Any] = {"file": path.name}
    if path.is_file():
        record["training"] = read_coda_meta(path).get("training")
    return record


def _start_from_weights(model: nn.Module, args: TrainConfig, bounded: BoundedConfig) -> int:
    """Load a CoDA weights file (e.g. the shipped one) as the starting point; returns the phase to
    start in: 2 when the file is already bounded (phase 1 is skipped), else 1."""
    assert args.init_weights is not None  # the caller starts from a file only when one is given
    meta = read_coda_meta(args.init_weights)
    settings, lora = meta["convert"], meta.get("lora") or {}
    if bool(settings.get("differential", True)) != (args.attention == "coda"):
        raise WeightsFileError(f"{args.init_weights} is not --attention {args.attention} weights")
    if args.trainable == "coda+lora" and lora.get("rank") != args.lora_rank:
        raise WeightsFileError(
            f"{args.init_weights} has LoRA rank {lora.get('rank')}, not --lora-rank {args.lora_rank}"
        )
    if settings.get("bounded") and BoundedConfig(**settings["bounded"]) != bounded:
        raise WeightsFileError(
            f"{args.init_weights} is bounded with {settings['bounded']}, not --config {args.config} "
            f"--num-sink {args.num_sink} --routing {' '.join(args.routing) or '(the preset)'} ({bounded.to_dict()}); "
            "pass --routing to match the file's thresholds"
        )
    apply_coda_weights(model, args.init_weights)
    return 2 if settings.get("bounded") else 1


# arguments that change which parameters exist, what they mean or how the optimizer groups them
# (--gate-lr adds a group): a resume must repeat them
RESUME_MUST_MATCH = ("attention", "trainable", "lora_rank", "config", "num_sink", "routing", "model", "gate_lr")


def _check_resumable(meta: dict[str, Any], args: TrainConfig, checkpoint: Path) -> None:
    saved = meta.get("args", {})
    differ = {k: (saved.get(k), str(getattr(args, k))) for k in RESUME_MUST_MATCH if k in saved}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        detail = ", ".join(f"--{k.replace('_', '-')} {old} (now {new})" for k, (old, new) in differ.items())
        raise TrainingSetupError(f"coda-train: {checkpoint} was written with {detail}; resume with the same settings")


def _meta(args: TrainConfig, phase: int, step: int) -> dict[str, Any]:
    return {"phase": phase, "step": step, "args": args.as_record()}


def _run_phase(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    phase: int,
    step: int,
    steps: int,
    stream: list[int],
    tokenizer: Any,
    bounded: BoundedConfig,
    args: TrainConfig,
    cluster: Cluster,
    log_path: Path,
    checkpoint: Path,
    began: float,
    teacher: nn.Module | None = None,
) -> bool:
    """Train ``steps - step`` more updates; False when the time budget stopped it (checkpointed).

    Under torchrun each process draws its own batches (its rank is in the seed), so an update
    averages ``batch_size x accum x processes`` rows; rank 0 logs and checkpoints."""
    from tqdm import tqdm

    device = cluster.device
    seq_len = args.seq_len if phase == 1 else args.phase2_seq_len
    source = batches(
        stream,
        tokenizer,
        seq_len=seq_len,
        batch_size=args.batch_size,
        seed=args.seed * 1_000_003 + phase * 10_007 + step + 7_919 * cluster.rank,  # resumed runs draw fresh ones
        retrieval_fraction=args.retrieval_fraction if phase == 2 else 0.0,
        fact_fraction=args.fact_fraction if phase == 2 else 0.0,
        recurring_keep=args.recurring_keep and phase == 2,
        fact_counts=tuple(args.fact_counts),
        value_first_share=args.value_first_share,
        value_first_keep=args.value_first_keep,
        min_distance=args.needle_distance if args.needle_distance is not None else 2 * bounded.window,
    )
    autocast = device.type == "cuda" and args.dtype == "bfloat16"
    gate = GateTargets(args.gate_weight, args.gate_keep, args.gate_drop, args.gate_refuse) if phase == 2 else None
    distill = Distillation(teacher, args.distill_weight) if phase == 2 and teacher is not None else None
    model.train()
    bar = tqdm(total=steps, initial=step, desc=f"phase {phase}", unit="step", disable=not cluster.is_main)
    tokens, window_began = 0, time.perf_counter()
    while step < steps:
        over = args.time_budget is not None and time.monotonic() - began > args.time_budget
        if distributed.all_sum([float(over)], cluster)[0] > 0:  # every rank stops at the same update
            if cluster.is_main:
                save_checkpoint(checkpoint, params, optimizer, _meta(args, phase, step))
            bar.close()
            return False
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * min(1.0, (step + 1) / max(1, args.warmup))
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "lm": 0.0, "answer": 0.0, "gate": 0.0, "distill": 0.0}
        for micro in range(args.accum):
            batch = next(source)
            with distributed.gradient_sync(model, enabled=micro == args.accum - 1):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss, parts = _loss(model, batch, device, args.answer_weight, gate, distill)
                (loss / args.accum).backward()
            for key, value in parts.items():
                totals[key] += value / args.accum
            tokens += batch.input_ids.numel() * cluster.world
        norm = torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        step += 1
        totals = dict(zip(totals, (v / cluster.world for v in distributed.all_sum(list(totals.values()), cluster)),
                          strict=True))  # fmt: skip
        rate = tokens / (time.perf_counter() - window_began)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", tok_s=f"{rate:,.0f}")
        record = {"phase": phase, "step": step, **totals, "grad_norm": float(norm), "tokens_per_s": rate,
                  "lr": optimizer.param_groups[0]["lr"], "elapsed_s": time.monotonic() - began}  # fmt: skip
        if device.type == "cuda":  # how much room is left for more rows per forward
            record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if not cluster.is_main:
            continue
        with log_path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        if step % args.save_every == 0 or step == steps:
            save_checkpoint(checkpoint, params, optimizer, _meta(args, phase, step))
    bar.close()
    return True


@dataclass(frozen=True)
class GateTargets:
    """Phase 2's write-gate hinge (training/gate_supervision.py): weight and target gates."""

    weight: float
    keep: float
    drop: float
    refuse: str = "tokens"


def _teacher(args: TrainConfig, device: torch.device) -> nn.Module:
    teacher, _, _ = _load(args)
    teacher.to(device).eval().requires_grad_(False)
    return teacher


def _param_groups(params: dict[str, nn.Parameter], args: TrainConfig) -> list[dict[str, Any]]:
    """One group at ``--lr``, or two when ``--gate-lr`` gives the write gates their own rate;
    ``base_lr`` is what warm-up scales."""
    is_gate = {n: ".gate_proj." in n and is_coda_parameter(n) for n in params}
    if args.gate_lr is None or not any(is_gate.values()):
        return [{"params": list(params.values()), "base_lr": args.lr}]
    gates = [p for n, p in params.items() if is_gate[n]]
    others = [p for n, p in params.items() if not is_gate[n]]
    return [{"params": others, "base_lr": args.lr}, {"params": gates, "base_lr": args.gate_lr}]


def _loss(
    model: nn.Module,
    batch: Batch,
    device: torch.device,
    answer_weight: float,
    gate: GateTargets | None = None,
    distill: Distillation | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    ids, labels, answers = (t.to(device) for t in (batch.input_ids, batch.labels, batch.answer_mask))
    supervise = gate is not None and gate.weight > 0
    with recorded_gate_logits(model, enabled=supervise) as gate_logits:
        logits = model(input_ids=ids, use_cache=False).logits.float()
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    scored = labels.flatten() != IGNORE
    lm = per_token[scored].mean()
    loss = lm
    parts = {"lm": lm.item()}
    if answers.any():
        answer = per_token[answers.flatten()].mean()
        loss = loss + answer_weight * answer
        parts["answer"] = answer.item()
    if supervise:
        assert gate is not None
        hinge = gate_hinge_loss(gate_logits, batch.keep_mask.to(device), gate.keep, gate.drop, gate.refuse)
        loss = loss + gate.weight * hinge
        parts["gate"] = hinge.item()
    if distill is not None and distill.weight > 0:
        # answers are the facts the original cannot see past its window; everything else it predicts best
        scored_rows = (labels != IGNORE) & ~answers
        kl = distillation_loss(logits, ids, scored_rows, distill.teacher)
        loss = loss + distill.weight * kl
        parts["distill"] = kl.item()
    parts["loss"] = loss.item()
    if not math.isfinite(parts["loss"]):
        raise FloatingPointError(f"training loss is {parts['loss']}: lower --lr or check the data")
    return loss, parts


def _load(args: TrainConfig) -> tuple[nn.Module, Any, str]:
    if args.tiny_model:
        tiny, byte_tokenizer = tiny_llama(seed=args.seed)
        return tiny, byte_tokenizer, "tiny-llama"

    model, tokenizer = load_model(args.model)
    return model, tokenizer, "smollm2-135m-instruct" if args.model == "smollm2" else str(args.model)


def _texts(args: TrainConfig) -> list[str]:
    if args.corpus == "wikipedia":
        return [doc.text for doc in load_wikipedia("train")]
    source = Path(args.corpus)
    files = sorted(source.glob("**/*.txt")) if source.is_dir() else [source]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"--corpus {source}: no .txt files there; pass 'wikipedia' or a text file/folder")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]
