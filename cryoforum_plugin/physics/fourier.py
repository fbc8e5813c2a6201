"""Fourier helpers (torch): centred transforms, frequency grids, centred cropping/padding (resampling: resample.py).

Centring: the origin of an N-pixel axis is at index N // 2 in real space and in Fourier space
(RELION's convention for even boxes). Image arrays are (..., y, x), volumes (z, y, x).
"""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    """NumPy array or tensor -> tensor on ``device`` with ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    x = np.asarray(x)
    if not x.flags.writeable or not x.flags.c_contiguous:  # e.g. a read-only memory map
        x = np.array(x)
    return torch.as_tensor(x, dtype=dtype, device=device)


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2-D FT over the last two axes: (..., N, N) real -> complex."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def ifft2c(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``fft2c`` (complex result)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def fft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred 3-D FT of a (N, N, N) volume."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x)))


def ifft3c(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``fft3c`` (complex result)."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x)))


def freq_1d(n: int, device=None) -> torch.Tensor:
    """Centred integer frequencies (or pixel coordinates) of an n-point axis: -n//2 ... (n-1)//2."""
    return torch.arange(n, device=device, dtype=torch.float32) - n // 2


def grid_2d(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ky, kx) integer-frequency grids of shape (n, n)."""
    f = freq_1d(n, device)
    return torch.meshgrid(f, f, indexing="ij")


def radius_2d(n: int, device=None) -> torch.Tensor:
    """(n, n) distance from the centre in pixels (or frequency index)."""
    ky, kx = grid_2d(n, device)
    return torch.sqrt(kx**2 + ky**2)


def radius_3d(n: int, device=None) -> torch.Tensor:
    """(n, n, n) distance from the centre in voxels."""
    f = freq_1d(n, device)
    z, y, x = torch.meshgrid(f, f, f, indexing="ij")
    return torch.sqrt(x**2 + y**2 + z**2)


def _crop_or_pad_centered(x: torch.Tensor, new: int, dims: int) -> torch.Tensor:
    old = x.shape[-1]
    if new == old:
        return x
    if new < old:
        start = old // 2 - new // 2
        for d in range(1, dims + 1):
            x = x.narrow(-d, start, new)
        return x
    shape = list(x.shape[:-dims]) + [new] * dims
    out = torch.zeros(shape, dtype=x.dtype, device=x.device)
    start = new // 2 - old // 2
    index = [slice(None)] * (x.dim() - dims) + [slice(start, start + old)] * dims
    out[tuple(index)] = x
    return out


def pad_real(x: torch.Tensor, new: int, dims: int) -> torch.Tensor:
    """Zero-pad (or crop) the last ``dims`` axes of x to ``new`` around the centre, in real space."""
    return _crop_or_pad_centered(x, new, dims)


def soft_circular_mask(n: int, inner: float, outer: float, device=None) -> torch.Tensor:
    """(n, n) mask: 1 inside ``inner``·n/2, cosine fall-off to 0 at ``outer``·n/2 (fractions of the half-box)."""
    r = radius_2d(n, device) / (n / 2)
    t = ((r - inner) / max(outer - inner, 1e-6)).clamp(0, 1)
    return 0.5 * (1 + torch.cos(np.pi * t))


def shift_phase(shifts_px: torch.Tensor, box: int, sign: float = 1.0) -> torch.Tensor:
    """(B, box, box) phase ramps exp(sign·2πi k·o/box) for origins (B, 2) (x, y) in pixels."""
    ky, kx = grid_2d(box, shifts_px.device)
    arg = (kx * shifts_px[:, 0, None, None] + ky * shifts_px[:, 1, None, None]) * (2 * np.pi / box)
    return torch.polar(torch.ones_like(arg), sign * arg)
