"""The run time: which device computes, how many CPU threads, and the processes of a multi-GPU run.

``resolve_device`` is the one place that turns a user's ``--device`` into a torch device. Multi-process
(multi-GPU, multi-node) runs go through torch.distributed, started by ``torchrun``:
``torchrun --nproc-per-node=4 -m cryoforum_plugin.cli train ...`` trains with DistributedDataParallel (one
process per GPU, NCCL; gloo on CPU); ``predict`` shards the particles across the processes and rank 0 writes
one merged output in the input order. Without torchrun (WORLD_SIZE unset) everything is single-process.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from cryoforum_plugin.errors import CryoforumError


def resolve_device(name=None) -> torch.device:
    """``None``/``auto`` -> CUDA when present else CPU; a torch.device is returned as is; otherwise the named
    device, checked (one clear error for an unknown name or a CUDA request without a GPU)."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CryoforumError(f"unknown device '{name}'.", fix="use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CryoforumError("--device cuda was asked for but no CUDA GPU is visible.",
                             fix="use --device cpu, or install a CUDA build of torch (see README).")
    return dev


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch (0: leave torch's default, all cores)."""
    if n and n > 0:
        torch.set_num_threads(n)


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
