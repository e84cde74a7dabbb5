"""``coda-train``: two-phase training of a converted model (docs/training.md).

Phase 1 trains unbounded differential attention (full cache); phase 2 switches every layer to
the bounded state (``to_bounded``) and trains through the bank writes, on text mixed with
retrieval documents whose key sits at least two windows before its question; a hinge loss on
the write gate teaches it to keep those keys and refuse other tokens (``--gate-weight``,
training/gate_supervision.py). Each phase's
steps count optimizer updates. A checkpoint (trained parameters + AdamW state) is written every
``--save-every`` steps and when ``--time-budget`` runs out; ``--resume`` continues from it. The
end result is a CoDA weights file (``--weights``) that ``apply_coda_weights`` loads on the base.

    coda-train --model smollm2 --out runs/smollm2 --phase1-steps 100 --phase2-steps 300

``coda-train --from-scratch ...`` trains a small model from random weights instead (``coda-scratch``).
Under ``torchrun`` it is data parallel (DDP): each process draws its own batches, rank 0 logs and
checkpoints (``torchrun --nproc_per_node 2 -m coda_gqa_l.training.cli ...``).
"""

from __future__ import annotations

import argparse
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

from ..cli_help import HelpFormatter, first_paragraph
from ..config import BoundedConfig, parse_routing
from ..data import load_wikipedia
from ..data.tokens import token_stream
from ..data.training_rows import FACT_COUNTS, IGNORE, Batch, batches
from ..models.convert import convert, to_bounded
from ..models.loader import load_model
from ..models.lora import add_lora
from ..models.params import is_coda_parameter, select_trainable
from ..models.tiny import tiny_llama
from ..models.weights import WeightsFileError, apply_coda_weights, read_coda_meta, save_coda_weights
from . import distributed
from .checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from .distributed import Cluster
from .gate_supervision import REFUSE_MODES, gate_hinge_loss, recorded_gate_logits
from .scratch import main as scratch_main

CHECKPOINT = "checkpoint.safetensors"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coda-train", description=first_paragraph(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (packaged) or a Hugging Face model folder")
    p.add_argument("--corpus", default="wikipedia", help="'wikipedia' (packaged train split) or a .txt file / folder")
    attention_help = "coda: differential attention; gqa: plain attention, same banks (the factorial's control)"
    p.add_argument("--attention", default="coda", choices=["coda", "gqa"], help=attention_help)
    p.add_argument("--config", default="medium", help="bounded preset for phase 2 (tiny/medium/large)")
    p.add_argument("--num-sink", type=int, default=4, help="sinks taken out of the exact bank")
    routing_help = "bank-routing thresholds instead of the preset's (e.g. novelty=0.9 match=0.97 max_inserts=16)"
    p.add_argument("--routing", nargs="+", default=[], metavar="NAME=VALUE", help=routing_help)
    # "all" would train the base weights, which a CoDA weights file does not hold: they would be lost at the end
    trainable_help = "which parameters train: the CoDA ones, or those and LoRA (the weights file holds both)"
    p.add_argument("--trainable", default="coda+lora", choices=["coda", "coda+lora"], help=trainable_help)
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA on the attention projections")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (scale = alpha / rank)")
    p.add_argument("--phase1-steps", type=int, default=100, help="updates of phase 1 (unbounded CoDA)")
    p.add_argument("--phase2-steps", type=int, default=300, help="updates of phase 2 (bounded, through the banks)")
    p.add_argument("--seq-len", type=int, default=1024, help="phase-1 sequence length")
    p.add_argument("--phase2-seq-len", type=int, default=2048, help="phase-2 sequence length")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps per update")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="updates of linear warm-up, in each phase")
    p.add_argument(
        "--retrieval-fraction", type=float, default=0.5, help="phase-2 rows that are pass-key documents (default 0.5)"
    )
    fact_help = "phase-2 rows that are fact documents: names, places, dates, ... asked at the end (default 0)"
    p.add_argument("--fact-fraction", type=float, default=0.0, help=fact_help)
    counts_help = "facts per fact row, drawn uniformly from this list; up to 5 of them asked (default 1 1 2 3 4 6)"
    p.add_argument("--fact-counts", type=int, nargs="+", default=list(FACT_COUNTS), metavar="N", help=counts_help)
    value_first_help = (
        "phase 2: the chance a fact is stated value first ('A brass astrolabe hangs above ...'), where its kind has "
        "such patterns (default: none, every pattern of the kind alike)"
    )
    p.add_argument("--value-first-share", type=float, default=None, help=value_first_help)
    recurring_help = "phase 2: in plain rows, capitalised words and numbers that recur 2 windows later are keep targets"
    p.add_argument("--recurring-keep", action="store_true", help=recurring_help)
    p.add_argument("--needle-distance", type=int, default=None, help="tokens from key to question (default 2 windows)")
    p.add_argument("--answer-weight", type=float, default=1.0, help="weight of the loss on answer tokens")
    gate_help = "phase 2: weight of the write-gate hinge loss (keys kept, other tokens refused; 0 turns it off)"
    p.add_argument("--gate-weight", type=float, default=1.0, help=gate_help)
    p.add_argument("--gate-keep", type=float, default=0.6, help="gate a key token should reach (> tau_exact)")
    p.add_argument("--gate-drop", type=float, default=0.01, help="gate every other token should fall to (< tau_exact)")
    refuse_help = (
        "phase 2: the hinge's refusal side averaged over all other tokens ('tokens') or over those still above "
        "--gate-drop ('violations': each false write weighs as much as a missed key; for value-first facts)"
    )
    p.add_argument("--gate-refuse", default="tokens", choices=list(REFUSE_MODES), help=refuse_help)
    p.add_argument("--gate-lr", type=float, default=None, help="learning rate of the write gates (default --lr)")
    distill_help = (
        "phase 2: weight of a KL loss to the original model's full-cache predictions on every token that is not an "
        "answer; keeps general text (the Bible) close to the original while the facts train (default 0: off)"
    )
    p.add_argument("--distill-weight", type=float, default=0.0, help=distill_help)
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the new weights")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast dtype on CUDA")
    p.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    p.add_argument(
        "--out", type=Path, default=Path("runs/coda-train"), help="folder for the log, checkpoint and weights"
    )
    p.add_argument("--weights", type=Path, default=None, help="final CoDA weights file (default OUT/coda.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    init_help = (
        "start from a CoDA weights file (e.g. the shipped one); bounded weights start in phase 2 (default: none)"
    )
    p.add_argument("--init-weights", type=Path, default=None, help=init_help)
    p.add_argument("--save-every", type=int, default=50, help="updates between checkpoints")
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds; then checkpoint and stop (default: none, no limit)"
    )
    p.add_argument("--tiny-model", action="store_true", help="a small random Llama and byte text (tests, smoke runs)")
    scratch_help = "train a small Llama from random weights instead; its options: coda-scratch --help"
    p.add_argument("--from-scratch", action="store_true", help=scratch_help)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.value_first_share is not None and not 0.0 <= args.value_first_share <= 1.0:
        parser.error(f"--value-first-share must be between 0 and 1, got {args.value_first_share}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--from-scratch" in argv:  # the from-scratch mode has its own options (coda-scratch --help)
        return scratch_main([a for a in argv if a != "--from-scratch"])
    args = parse_args(argv)
    with distributed.session(args.device) as cluster:
        return _train(args, cluster)


def _train(args: argparse.Namespace, cluster: Cluster) -> int:
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
        raise SystemExit(f"coda-train: {exc}") from None
    if args.gate_weight > 0 and not 0 < args.gate_drop < bounded.tau_exact < args.gate_keep < 1:
        raise SystemExit(
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


def _save_weights(model: nn.Module, args: argparse.Namespace, base: str, device: torch.device, completed: bool) -> None:
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


def _start_from_weights(model: nn.Module, args: argparse.Namespace, bounded: BoundedConfig) -> int:
    """Load a CoDA weights file (e.g. the shipped one) as the starting point; returns the phase to
    start in: 2 when the file is already bounded (phase 1 is skipped), else 1."""
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


def _check_resumable(meta: dict[str, Any], args: argparse.Namespace, checkpoint: Path) -> None:
    saved = meta.get("args", {})
    differ = {k: (saved.get(k), str(getattr(args, k))) for k in RESUME_MUST_MATCH if k in saved}
    differ = {k: pair for k, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        detail = ", ".join(f"--{k.replace('_', '-')} {old} (now {new})" for k, (old, new) in differ.items())
        raise SystemExit(f"coda-train: {checkpoint} was written with {detail}; resume with the same settings")


def _meta(args: argparse.Namespace, phase: int, step: int) -> dict[str, Any]:
    return {"phase": phase, "step": step, "args": {k: str(v) for k, v in vars(args).items()}}


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
    args: argparse.Namespace,
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


@dataclass(frozen=True)
class Distillation:
    """Phase 2's KL loss to the original model (``--distill-weight``)."""

    teacher: nn.Module
    weight: float


def _teacher(args: argparse.Namespace, device: torch.device) -> nn.Module:
    teacher, _, _ = _load(args)
    teacher.to(device).eval().requires_grad_(False)
    return teacher


def distillation_loss(
    student_logits: torch.Tensor, ids: torch.Tensor, scored: torch.Tensor, teacher: nn.Module
) -> torch.Tensor:
    """KL(teacher || student) per scored token, averaged over the scored tokens.

    The teacher's logits are kept as it returns them (bf16 under autocast) and turned into
    probabilities one row at a time, in the forward and again in the backward (``_TeacherKL``): a
    16 x 2,048-token batch would otherwise hold several float32 copies of sequence x vocabulary."""
    if not bool(scored.any()):
        return student_logits.new_zeros(())
    with torch.no_grad():
        rows = [teacher(input_ids=ids[r : r + 4], use_cache=False).logits for r in range(0, ids.shape[0], 4)]
    return _TeacherKL.apply(student_logits, torch.cat(rows), scored)


class _TeacherKL(torch.autograd.Function):
    """mean over scored tokens of sum_v p_t (log p_t - log p_s); its gradient in the student's
    logits is (p_s - p_t) / count at scored tokens, computed row by row."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        count = int(scored.sum())
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for row in range(student.shape[0]):
            if scored[row].any():
                mine = F.log_softmax(student[row, scored[row]].float(), dim=-1)
                theirs = F.log_softmax(teacher[row, scored[row]].float(), dim=-1)
                total += (theirs.exp() * (theirs - mine)).sum()
        ctx.save_for_backward(student, teacher, scored)
        ctx.count = count
        return total / count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        student, teacher, scored = ctx.saved_tensors
        out = torch.zeros_like(student)
        scale = grad / ctx.count
        for row in range(student.shape[0]):
            if scored[row].any():
                mine = F.softmax(student[row, scored[row]].float(), dim=-1)
                theirs = F.softmax(teacher[row, scored[row]].float(), dim=-1)
                out[row, scored[row]] = ((mine - theirs) * scale).to(out.dtype)
        return out, None, None


def _param_groups(params: dict[str, nn.Parameter], args: argparse.Namespace) -> list[dict[str, Any]]:
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


def _load(args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    if args.tiny_model:
        tiny, byte_tokenizer = tiny_llama(seed=args.seed)
        return tiny, byte_tokenizer, "tiny-llama"

    model, tokenizer = load_model(args.model)
    return model, tokenizer, "smollm2-135m-instruct" if args.model == "smollm2" else str(args.model)


def _texts(args: argparse.Namespace) -> list[str]:
    if args.corpus == "wikipedia":
        return [doc.text for doc in load_wikipedia("train")]
    source = Path(args.corpus)
    files = sorted(source.glob("**/*.txt")) if source.is_dir() else [source]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"--corpus {source}: no .txt files there; pass 'wikipedia' or a text file/folder")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


if __name__ == "__main__":
    raise SystemExit(main())
