"""Work split over processes: run_predict.sh and run_embedding.sh start one per GPU under torchrun (NUM_GPUS); each
takes the items i with i % world == rank, and rank 0 puts the results together. gloo carries the few small messages
(sums, texts), so the same code runs on GPUs and on CPU processes (the tests)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def process_shard() -> tuple[int, int]:
    """(rank, world size) of this process: torchrun's RANK and WORLD_SIZE, (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def start_shards(use_gpu: bool = True) -> tuple[int, int]:
    """Join the other processes (gloo; a long timeout, as shards may finish hours apart) and take this process's
    GPU, as torchrun numbers them. (rank, world); alone: nothing to join."""
    rank, world = process_shard()
    if world > 1:
        import torch.distributed as dist

        if use_gpu and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(days=7))
    return rank, world


def gather_to_first(value):
    """Every process's `value`, in rank order, on rank 0 (None elsewhere); alone: [value]. Also a barrier."""
    rank, world = process_shard()
    if world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * world
    dist.all_gather_object(values, value)
    return values if rank == 0 else None


def wait_for_all() -> None:
    """Every process reaches this line before any goes on; alone: nothing."""
    if process_shard()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def stop_shards() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every process past its last message before any tears its connections down: a gloo process whose peer
        # closed first was seen to abort at exit (1 run in 24 of tests/test_pretrain.py's two-process evaluation)
        dist.barrier()
        dist.destroy_process_group()
