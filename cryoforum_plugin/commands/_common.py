"""Small helpers shared by the command modules."""

import torch

from ..errors import CryoforumError


def resolve_device(name: str | None) -> torch.device:
    """``auto`` -> CUDA when present else CPU; otherwise the named device, checked."""
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
