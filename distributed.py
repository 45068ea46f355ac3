"""Data-parallel training under torchrun: `torchrun --nproc_per_node N train.py ...`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; with WORLD_SIZE > 1 the process group starts (NCCL on CUDA, gloo
on the CPU). Every rank holds the same trainable parameters (same seed at initialisation); after each backward
pass the gradients of every trainable parameter (the LoRA adapters or the transformer, and log Z) are averaged
over ranks with one all-reduce each, so every rank takes the same optimizer step, as DistributedDataParallel
would (the policy's loss is not a plain forward call, which DDP's wrapper assumes, so the all-reduce is done here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )


def teardown(info: DistInfo, clean_exit: bool = True) -> None:
    if info.enabled and dist.is_initialized():
        if clean_exit:
            # A rank that leaves while a peer is still receiving its last gather (the checkpoint's RNG states)
            # tears gloo's pair down under the transfer and aborts ("terminate called without an active
            # exception"); wait until every rank is done. Not after an error: the peers may never arrive.
            dist.barrier()
        dist.destroy_process_group()


def average_gradients(parameters, info: DistInfo) -> None:
    if not info.enabled:
        return
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a rank whose batch had no valid sample still joins the all-reduce
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= info.world_size


def broadcast(obj, info: DistInfo, src: int = 0):
    """Rank src's object on every rank (pickled; tensors should be on the CPU)."""
    if not info.enabled:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_main(obj, info: DistInfo) -> list | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any (for decisions every rank must take together)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def share_batch(batch, info: DistInfo, device: torch.device, reward_rank0: bool, to_records) -> tuple:
    """(this rank's part of the scored batch, the sample records rank 0 writes) for each distributed mode:
    one process: the batch as it is; asymmetric (--reward-rank0): rank 0's whole batch is broadcast, each rank
    trains on its contiguous shard; symmetric: every rank keeps its own batch and its records are gathered.
    The batch is None on every rank when any rank's source stopped (the budget)."""
    if not info.enabled:
        return batch, (to_records(batch) if batch is not None else [])
    if reward_rank0:
        batch = broadcast(batch.to("cpu") if info.is_main and batch is not None else None, info)
        if batch is None:
            return None, []
        size = len(batch.rewards.texts) // info.world_size
        return batch[info.rank * size : (info.rank + 1) * size].to(device), (to_records(batch) if info.is_main else [])
    gathered = gather_to_main(to_records(batch) if batch is not None else None, info)
    records = [record for rank_records in gathered or [] for record in (rank_records or [])]
    return (None if any_rank(batch is None, info) else batch), records
