"""Running on several processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK): who am I, the device,
joining and leaving the process group, barriers, and averaging gradients and metrics over ranks.

Every helper is a no-op on a single process, so the trainer and the search call them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fasterkd.utils import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(device: str | torch.device) -> torch.device:
    """:func:`fasterkd.utils.pick_device`, on this rank's GPU under torchrun (``LOCAL_RANK``)."""
    device = pick_device(device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return DistInfo(rank=rank, world=world, local_rank=local, started_here=started)


def shutdown(info: DistInfo) -> None:
    """Leave the process group this run joined (one that a caller started stays)."""
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def mean_over_ranks(means: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Each value averaged over the ranks (one float64 all-reduce, keys in sorted order)."""
    if not info.enabled:
        return means
    t = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(sorted(means), t)}


def global_images_per_step(local_images: int, steps: int, info: DistInfo) -> float:
    """The images one optimiser step saw over all ranks: this rank's count summed over the ranks
    (one all-reduce), per step; a measured check that ``batch_size`` is the global batch."""
    total = torch.tensor([float(local_images)], dtype=torch.float64)
    if info.enabled:
        dist.all_reduce(total)
    return float(total.item()) / max(1, steps)


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce; no-op on one rank).

    A parameter without a gradient on some rank (a width or op not sampled there) gets a zero one
    wherever another rank has one, so every rank's optimiser steps the same parameters.
    """
    if not info.enabled or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(params, has.tolist()) if h]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for p in used:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Every rank takes rank 0's buffers (BN running statistics), e.g. before validating."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def ddp_max_weight_diff(model: nn.Module, info: DistInfo) -> float:
    """Largest |w_rank - w_rank0| over all parameters (0.0 when the replicas agree).

    BN running statistics are left out: each rank updates them from its own batch and DDP
    broadcasts rank 0's (the ones rank 0 saves) at the start of the next forward.
    """
    if not info.enabled:
        return 0.0
    flat = torch.cat([t.detach().float().flatten().cpu() for t in unwrap(model).parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([(flat - ref).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())
