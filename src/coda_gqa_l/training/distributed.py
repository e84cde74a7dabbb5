"""Several processes under ``torchrun``: process group, model wrapping (DDP or FSDP), and the
few collectives the trainers need.

One process per GPU (NCCL), or per CPU process (gloo) for tests. Outside ``torchrun``
(``WORLD_SIZE`` unset or 1) everything here is a no-op and the model is not wrapped. How ranks
split the data is the trainer's: in ``coda-scratch`` every rank draws the same global batch from
the same seed and keeps its own rows (``rank::world``), so N processes see the data of one process
with the same global batch, in the same order; in ``coda-train`` each rank draws its own batches
(its rank is in the seed).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..models.convert import decoder_layers


@dataclass(frozen=True)
class Cluster:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and results; the others only compute."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start(device: str | None = None) -> Cluster:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wanted = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.type == "cuda":
        if world > 1 and torch.cuda.device_count() < world and wanted.index is None:
            raise RuntimeError(f"{world} processes but {torch.cuda.device_count()} GPUs: one GPU per process")
        wanted = torch.device("cuda", local_rank if wanted.index is None else wanted.index)
        torch.cuda.set_device(wanted)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if wanted.type == "cuda" else "gloo"
        kwargs = {"device_id": wanted} if wanted.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10), **kwargs)  # type: ignore[arg-type]
    return Cluster(rank=rank, world=world, local_rank=local_rank, device=wanted)


def stop(failed: bool = False) -> None:
    """Leave the process group; after a failure without the final barrier, which the other ranks
    (stuck in a collective) would never reach: the error then ends this process and torchrun the rest."""
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | None = None) -> Iterator[Cluster]:
    """``start`` ... ``stop``: the final barrier on success, none after an error."""
    cluster = start(device)
    try:
        yield cluster
    except BaseException:
        stop(failed=True)
        raise
    stop()


def wrap(model: nn.Module, cluster: Cluster, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2, one shard group per decoder layer) around ``model``; unchanged for one process."""
    if not cluster.distributed:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5 keeps FSDP2 under its first, private name
            from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [cluster.device.index] if cluster.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the all-reduce on accumulation micro-steps (DDP's ``no_sync``, FSDP2's flag)."""
    if enabled:
        yield
        return
    no_sync: Any = getattr(model, "no_sync", None)
    set_sync: Any = getattr(model, "set_requires_gradient_sync", None)
    if no_sync is not None:  # DDP
        with no_sync():
            yield
    elif set_sync is not None:  # FSDP2
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def all_sum(values: list[float], cluster: Cluster) -> list[float]:
    """Element-wise sum over ranks (float64), e.g. loss sums and token counts."""
    if not cluster.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=cluster.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a (possibly FSDP-sharded) parameter or state; collective when sharded."""
    gather = getattr(value, "full_tensor", None)
    return gather() if gather is not None else value
