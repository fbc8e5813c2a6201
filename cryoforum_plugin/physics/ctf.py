"""Contrast transfer function in RELION's formulation (ctf.h), evaluated on centred Fourier grids."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics.fourier import as_tensor, grid_2d


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for the acceleration voltage in kV (array or tensor, same type out)."""
    if isinstance(voltage_kv, torch.Tensor):
        v = voltage_kv * 1e3
        return 12.2643247 / torch.sqrt(v * (1 + v * 0.978466e-6))
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))


def ctf_2d(defocus_u_A: torch.Tensor, defocus_v_A: torch.Tensor, astigmatism_angle_deg: torch.Tensor,
           voltage_kV: torch.Tensor, cs_mm: torch.Tensor, amplitude_contrast: torch.Tensor,
           phase_shift_deg: torch.Tensor, pixel_size_A: torch.Tensor, box: int) -> torch.Tensor:
    """CTF images (B, box, box) on the centred Fourier grid of a ``box``-pixel image, in RELION's formulation.

    Every argument but ``box`` is a (B,) float tensor on the output's device (float32 in the package): defocus
    U and V (Å), the astigmatism angle (degrees), the acceleration voltage (kV), spherical aberration (mm), the
    amplitude contrast (fraction), the phase shift (degrees) and the pixel size (Å).
    Sign as RELION: CTF = -sin(χ) with χ = -π λ Δf k² + π/2 Cs λ³ k⁴ - phase shift - atan(Q/√(1-Q²)),
    Δf = (U+V)/2 + (U-V)/2·cos 2(α - angle).
    """
    def per_image(t):
        return t[:, None, None]

    device = defocus_u_A.device
    lam = per_image(electron_wavelength(voltage_kV.double()).to(voltage_kV.dtype))  # λ in float64 (≈0.02 Å)
    apix = per_image(pixel_size_A)
    ky, kx = grid_2d(box, device)
    sx, sy = kx / (box * apix), ky / (box * apix)  # 1/Å
    s2 = sx**2 + sy**2
    alpha = torch.atan2(sy, sx)
    u, v = per_image(defocus_u_A), per_image(defocus_v_A)
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2 * (alpha - torch.deg2rad(per_image(astigmatism_angle_deg))))
    cs = per_image(cs_mm) * 1e7
    q = per_image(amplitude_contrast).clamp(0, 0.999)
    phase = torch.deg2rad(per_image(phase_shift_deg))
    chi = -np.pi * lam * defocus * s2 + 0.5 * np.pi * cs * lam**3 * s2**2 - phase - torch.atan(q / torch.sqrt(1 - q**2))
    return -torch.sin(chi)


CTF_2D_ORDER = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "phase_shift")
"""The CTF dict's keys in ``ctf_2d``'s argument order (the rows of a ``ctf_table``)."""


def _host_table(ctf: dict, rows) -> np.ndarray:
    """(7, B) float64: the CTF dict's values of ``rows`` (an index array or a slice), in CTF_2D_ORDER."""
    return np.stack([np.asarray(ctf[k], dtype=np.float64)[rows] for k in CTF_2D_ORDER])


def ctf_table(ctf: dict, device=None) -> torch.Tensor:
    """(7, M) float32 tensor on ``device``: every particle's parameters of a CTF dict, one row per key of
    CTF_2D_ORDER, copied in one transfer; ``ctf_images`` indexes it on the device."""
    return as_tensor(_host_table(ctf, slice(None)), device)


def ctf_images(ctf, rows, box: int, pixel_size, device=None) -> torch.Tensor:
    """CTF images (B, box, box) for the particles ``rows`` at ``pixel_size`` Å (scalar or (B,)), handed to
    ``ctf_2d``. ``ctf``: a CTF dict (per-particle arrays keyed as ``columns.CTF_FIELDS``: defocus Å, angles degrees,
    kV, mm), whose rows are copied to ``device`` in one transfer; or a ``ctf_table`` of every particle already on
    its device, indexed there by ``rows`` (an array, or a tensor on that device: no transfer at all with a scalar
    ``pixel_size``; the images are on the table's device)."""
    if isinstance(ctf, torch.Tensor):
        params = ctf[:, torch.as_tensor(rows, device=ctf.device)]
        if np.ndim(pixel_size) == 0:
            apix = torch.full(params.shape[1:], float(pixel_size), dtype=params.dtype, device=ctf.device)
        else:
            apix = as_tensor(np.asarray(pixel_size, dtype=np.float64), ctf.device)
        return ctf_2d(*params, apix, box)
    rows = np.asarray(rows)
    apix = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), rows.shape)
    table = np.concatenate([_host_table(ctf, rows), apix[None]])  # (8, B): one copy to the device
    return ctf_2d(*as_tensor(table, device), box)
