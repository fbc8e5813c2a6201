"""Fourier shell correlation, resolution at a threshold, soft masks, plots."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics.fourier import as_tensor, fft3c, radius_3d


def fsc_curve(map1, map2, mask=None) -> np.ndarray:
    """FSC per shell (index 0 .. D//2 - 1) of two (D, D, D) maps, optionally multiplied by a mask first."""
    a, b = as_tensor(map1), as_tensor(map2)
    if mask is not None:
        m = as_tensor(mask)
        a, b = a * m, b * m
    fa, fb = fft3c(a.double()), fft3c(b.double())
    d = a.shape[-1]
    shell = torch.round(radius_3d(d)).long().reshape(-1)
    keep = shell < d // 2
    shell = shell[keep]
    num = torch.zeros(d // 2, dtype=torch.float64).index_add_(0, shell, (fa * fb.conj()).real.reshape(-1)[keep])
    pa = torch.zeros(d // 2, dtype=torch.float64).index_add_(0, shell, (fa.abs() ** 2).reshape(-1)[keep])
    pb = torch.zeros(d // 2, dtype=torch.float64).index_add_(0, shell, (fb.abs() ** 2).reshape(-1)[keep])
    return (num / torch.sqrt(pa * pb).clamp_min(1e-30)).numpy()


def resolution(curve: np.ndarray, box: int, pixel_size: float, threshold: float) -> float:
    """Resolution in Å where the FSC first falls below ``threshold`` (linear interpolation between shells);
    the Nyquist limit 2·pixel size if it never does."""
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            f0, f1 = curve[i - 1], curve[i]
            t = (f0 - threshold) / (f0 - f1) if f0 != f1 else 0.0
            shell = (i - 1) + t
            return float(box * pixel_size / max(shell, 1e-6))
    return float(2 * pixel_size)


def soft_sphere_mask(box: int, radius: float, edge: float = 6.0) -> np.ndarray:
    """(D, D, D) spherical mask of ``radius`` pixels with a cosine edge of ``edge`` pixels."""
    r = radius_3d(box).numpy()
    t = np.clip((r - radius) / max(edge, 1e-6), 0, 1)
    return (0.5 * (1 + np.cos(np.pi * t))).astype(np.float32)


def fsc_table(curve: np.ndarray, box: int, pixel_size: float) -> list[dict]:
    """Rows {shell, frequency 1/Å, resolution Å, fsc} for CSV/JSON output."""
    rows = []
    for i, v in enumerate(curve):
        freq = i / (box * pixel_size)
        rows.append({"shell": i, "frequency_invA": freq, "resolution_A": (1 / freq) if i else float("inf"),
                     "fsc": float(v)})
    return rows

