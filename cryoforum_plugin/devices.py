"""Compute devices and CPU threads: the one place that turns a user's ``--device`` into a torch device."""

from __future__ import annotations

import torch

from .errors import CryoforumError


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
