"""The numeric precision of the network (``--precision``): autocast to bfloat16 or float16, or plain float32.

``resolve`` is the one place that turns the option and the device into what the training and prediction loops
need; ``autocast`` is the context they run the network in. The heads compute in float32/float64 whatever the
precision (model.py), and the weights, gradients and optimiser state stay float32.
"""

from __future__ import annotations

import torch

from cryoforum_plugin.errors import CryoforumError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16() -> bool:
    """Whether the current CUDA GPU computes in bfloat16 natively (Ampere and later; older GPUs only emulate it)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument
        return torch.cuda.is_bf16_supported()


def resolve(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, None for float32; whether training needs a GradScaler) for ``precision`` on ``device``.

    auto: bfloat16 on a CUDA GPU that has it natively, float16 on an older GPU (with a GradScaler: small float16
    gradients underflow to 0 without loss scaling), float32 on any other device (the CPU). bf16 and fp16 are used
    as named on any device (torch's CPU autocast has both; fp16 is slow on most CPUs); bf16 on a GPU without it
    is refused. fp32: no autocast."""
    if precision not in PRECISIONS:
        raise CryoforumError(f"unknown precision '{precision}'.", fix="use --precision auto, bf16, fp16 or fp32.")
    cuda = device.type == "cuda"
    if precision == "auto":
        precision = ("bf16" if native_bf16() else "fp16") if cuda else "fp32"
    elif precision == "bf16" and cuda and not native_bf16():
        raise CryoforumError("--precision bf16: this GPU has no native bfloat16 (it needs an Ampere or later GPU).",
                             fix="use --precision auto (float16 with loss scaling on this GPU) or fp32.")
    dtype = _DTYPES.get(precision)
    return dtype, dtype is torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The context the network runs in: torch.autocast to ``dtype`` on ``device``, or float32 (off) for None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
