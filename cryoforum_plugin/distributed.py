"""Multi-process (multi-GPU, multi-node) support through torch.distributed, started by ``torchrun``.

``torchrun --nproc-per-node=4 -m cryoforum_plugin.cli train ...`` trains with DistributedDataParallel (one
process per GPU, NCCL; gloo on CPU); ``predict`` shards the particles across the processes and rank 0 writes
one merged output in the input order. Without torchrun (WORLD_SIZE unset) everything is single-process.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_from_env() -> tuple[int, int]:
    """Initialise the process group when started by torchrun; returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The GPU of this process (LOCAL_RANK) when running distributed on CUDA, else ``device``."""
    if dist.is_initialized() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown(wait: bool = True) -> None:
    """End a distributed run cleanly: wait for every rank (unless this one failed), then destroy the process group
    (an exit with a live gloo/NCCL group can abort the process)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every process (the value itself when not distributed)."""
    if not dist.is_initialized():
        return int(value)
    box = [int(value)]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def shard(n: int) -> np.ndarray:
    """This process's contiguous block of row indices out of ``n``."""
    r, w = rank(), world_size()
    return np.arange(n * r // w, n * (r + 1) // w)


def gather_rows(rows: np.ndarray, values: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray] | None:
    """Collect every process's (rows, values) on rank 0, reassembled in row order (None on other ranks)."""
    if not dist.is_initialized():
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, (rows, values))
    if not is_main():
        return None
    out = {}
    for key in values:
        first = next((p[1][key] for p in parts if p[1][key] is not None), None)
        if first is None:
            out[key] = None
            continue
        full = np.zeros((n, *first.shape[1:]), dtype=first.dtype)
        for r, v in parts:
            full[r] = v[key]
        out[key] = full
    return out
