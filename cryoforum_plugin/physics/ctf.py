"""Contrast transfer function in RELION's formulation (ctf.h), evaluated on centred Fourier grids."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics.fourier import as_tensor, grid_2d


def electron_wavelength(voltage_kv) -> np.ndarray:
    """Relativistic electron wavelength in Å for the acceleration voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))


def ctf_2d(ctf: dict, rows, box: int, pixel_size, device=None) -> torch.Tensor:
    """CTF images (B, box, box) on the centred grid for the particles ``rows`` of a CTF dict.

    ``ctf``: per-particle arrays as in particles.CTF_FIELDS (defocus Å, angles degrees, kV, mm).
    ``pixel_size``: Å per pixel of the box (scalar or (B,)).
    Sign as RELION: CTF = -sin(χ) with χ = -π λ Δf k² + π/2 Cs λ³ k⁴ - phase shift - atan(Q/√(1-Q²)),
    Δf = (U+V)/2 + (U-V)/2·cos 2(α - angle).
    """
    rows = np.asarray(rows)

    def get(key):
        return as_tensor(np.asarray(ctf[key], dtype=np.float64)[rows], device)[:, None, None]

    lam = as_tensor(electron_wavelength(np.asarray(ctf["voltage"])[rows]), device)[:, None, None]
    apix = as_tensor(np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), rows.shape), device)[:, None, None]
    ky, kx = grid_2d(box, device)
    sx, sy = kx / (box * apix), ky / (box * apix)  # 1/Å
    s2 = sx**2 + sy**2
    alpha = torch.atan2(sy, sx)
    u, v = get("defocus_u"), get("defocus_v")
    ang = torch.deg2rad(get("defocus_angle"))
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2 * (alpha - ang))
    cs = get("cs") * 1e7
    q = get("amp_contrast").clamp(0, 0.999)
    phase = torch.deg2rad(get("phase_shift"))
    chi = -np.pi * lam * defocus * s2 + 0.5 * np.pi * cs * lam**3 * s2**2 - phase - torch.atan(q / torch.sqrt(1 - q**2))
    return -torch.sin(chi)
