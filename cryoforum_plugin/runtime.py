"""The run time: which device computes, how many CPU threads, and the processes of a multi-GPU run.

``resolve_device`` is the one place that turns a user's ``--device`` into a torch device. Multi-process
(multi-GPU, multi-node) runs go through torch.distributed, started by ``torchrun``:
``torchrun --nproc-per-node=4 -m cryoforum_plugin.cli train ...`` trains with DistributedDataParallel (one
process per GPU, NCCL; gloo on CPU); ``predict`` shards the particles across the processes and rank 0 writes
one merged output in the input order. Without torchrun (WORLD_SIZE unset) everything is single-process.
"""

from __future__ import annotations

import datetime
import inspect
import os

import numpy as np
import torch
import torch.distributed as dist

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.progress import Events

# torch >= 2.3 binds the process group to one GPU (device_id); older versions guess it from the current device
_INIT_TAKES_DEVICE_ID = "device_id" in inspect.signature(dist.init_process_group).parameters


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


def device_from_relion_gpu(text, local_rank: int | None = None) -> str | None:
    """The device of RELION's ``gpu`` field (``--gpu``): one process uses one GPU.

    RELION's syntax: ids separated by ',' (threads) or ':' (MPI ranks), e.g. ``0``, ``0,1``, ``0:1``; both
    separators list GPUs alike here. Empty (or None) -> None: not given, the job's ``--device`` decides (auto: the
    first visible GPU, else the CPU). One id -> ``cuda:ID``. Several ids: under torchrun (``local_rank``, this
    process's LOCAL_RANK) the id at position ``local_rank``; without torchrun one clear error. Ids index the
    GPUs of CUDA_VISIBLE_DEVICES, as torch does. A GPU asked for on a machine without one is an error too."""
    text = "" if text is None else str(text).strip()
    if not text:
        return None
    parts = [p.strip() for p in text.replace(":", ",").split(",")]
    if not all(p.isdigit() for p in parts):
        raise CryoforumError(f"the gpu field (--gpu '{text}') is not a list of GPU ids.",
                             fix="give GPU ids as RELION does: 0, or 0,1 / 0:1 (one per torchrun process), "
                                 "or leave it empty for the first visible GPU (else the CPU).")
    ids = [int(p) for p in parts]
    if len(ids) > 1 and local_rank is None:
        raise CryoforumError(f"the gpu field (--gpu '{text}') lists {len(ids)} GPUs, but one process uses one GPU.",
                             fix=f"give one id (e.g. --gpu {ids[0]}), or run the job under torchrun with one "
                                 f"process per id: torchrun --standalone --nproc-per-node={len(ids)} -m "
                                 f"relion_external.cryoforum_relion ... --gpu {text} (docs/relion.md).")
    if not torch.cuda.is_available():
        raise CryoforumError(f"the gpu field (--gpu '{text}') asks for a GPU, but no CUDA GPU is visible here.",
                             fix="leave gpu empty to run on the CPU, or run the job on a GPU node with a CUDA "
                                 "build of torch (README: Installing on a GPU cluster).")
    if local_rank is not None and len(ids) > 1 and local_rank >= len(ids):
        raise CryoforumError(f"the gpu field (--gpu '{text}') lists {len(ids)} GPUs, but this is torchrun "
                             f"process {local_rank} of its node.",
                             fix="give one id per process: as many ids as --nproc-per-node.")
    gpu = ids[local_rank] if len(ids) > 1 else ids[0]
    count = torch.cuda.device_count()
    if gpu >= count:
        raise CryoforumError(f"the gpu field (--gpu '{text}') asks for GPU {gpu}, but {count} GPU(s) are "
                             f"visible (ids 0-{count - 1}).",
                             fix="use the ids of nvidia-smi, counted within CUDA_VISIBLE_DEVICES when it is set.")
    return f"cuda:{gpu}"


def local_rank() -> int | None:
    """This process's index among its node's processes (LOCAL_RANK, set by torchrun; 0 in a multi-process run
    launched without it); None in a single-process run."""
    value = os.environ.get("LOCAL_RANK", "").strip()
    if value:
        return int(value)
    return 0 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def local_device(device) -> torch.device:
    """The device of this process: under torchrun, CUDA without an index becomes ``cuda:LOCAL_RANK`` (one GPU per
    process); an explicit ``cuda:N`` (e.g. from ``device_from_relion_gpu``) and the CPU stay as they are."""
    device = resolve_device(device)
    lr = local_rank()
    if device.type == "cuda" and device.index is None and lr is not None:
        return torch.device("cuda", lr)
    return device


# How long a rank waits for the others at a collective (torch's default: 10 min for NCCL, 30 for gloo). In a whole
# job rank 0 refines, selects and reconstructs alone after the sharded prediction while the other ranks wait at
# the exit barrier: hours for a large set, so the group's timeout must cover the longest single-rank step.
GROUP_TIMEOUT = datetime.timedelta(hours=24)


def init_from_env(device=None) -> tuple[int, int]:
    """Initialise the process group when started by torchrun (WORLD_SIZE > 1); returns (rank, world size).

    The backend follows this process's device (``device`` as ``resolve_device`` takes it): gloo for the CPU, so
    ``--device cpu`` works on a GPU node; NCCL for CUDA, with the process's GPU (``local_device``) made current
    before the group starts and named to it (``device_id``, where torch has it), so NCCL never guesses the GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dev = local_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", timeout=GROUP_TIMEOUT,
                                    **({"device_id": dev} if _INIT_TAKES_DEVICE_ID else {}))
        else:
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    return rank(), world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


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


def tune_for(device: torch.device) -> None:
    """Fast kernels on a CUDA device, nothing elsewhere (CPU results stay bit-identical): cuDNN autotuning
    (``cudnn.benchmark``: the fastest convolution algorithms for each input shape, timed on its first batch; GPU
    runs are then not bit-reproducible) and TensorFloat-32 for float32 matrix products and convolutions (the float32
    parts of a mixed-precision run and --precision fp32: float32 storage and accumulation, 10-bit mantissa
    products on the tensor cores)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the legacy flags may not be mixed in
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


COMPILE_CPU_NOTE = "--compile is for CUDA devices; ignored on the CPU"


def compiled(module: torch.nn.Module, device: torch.device, enabled: bool,
             events: Events | None = None) -> torch.nn.Module:
    """``module`` for the forward passes under ``--compile``: wrapped by ``torch.compile`` on a CUDA device (same
    parameters; the wrapper's state_dict keys gain '_orig_mod.', so checkpoints are saved from and loaded into
    ``module`` itself), else ``module`` unchanged; on another device one note through ``events`` (never fails)."""
    if not enabled:
        return module
    if device.type != "cuda":
        (events or Events()).message(COMPILE_CPU_NOTE)
        return module
    return torch.compile(module)
