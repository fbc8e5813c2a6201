"""Fourier shell correlation, resolution at a threshold, FSC weighting of a map, soft masks."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics.fourier import as_tensor, fft3c, ifft3c, radius_3d


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


def fsc_shell_weights(curve: np.ndarray, of: str) -> np.ndarray:
    """Per-shell weights (D//2,) of a map from its half-maps' FSC curve (D//2,), FSC clipped to [0, 1]:
    ``of="half"``: one half-map's Wiener filter SSNR / (1 + SSNR) with its SSNR = FSC / (1 - FSC), i.e. the FSC
    (the refinement's gold-standard references); ``of="full"``: the full map's C_ref = sqrt(2·FSC / (1 + FSC))
    (Rosenthal & Henderson 2003; the training map), the full map's correlation with the truth."""
    c = np.clip(curve, 0, 1)
    if of == "half":
        return c
    if of == "full":
        return np.sqrt(2 * c / (1 + c))
    raise ValueError(f"of must be 'half' or 'full', not {of!r}")


def fsc_weighted(maps: dict) -> tuple[np.ndarray, np.ndarray]:
    """The full map of ``reconstruct.reconstruct(..., halves=True)`` (``maps``: "full", "half1", "half2", each
    (D, D, D)) multiplied per Fourier shell by sqrt(2·FSC / (1 + FSC)) of its half-maps (0 where the FSC is <= 0
    and beyond the last shell): the noise of a small reconstruction is filtered out before it is projected as if
    it were signal. Returns (map (D, D, D) float32, FSC curve (D//2,))."""
    curve = fsc_curve(maps["half1"], maps["half2"])
    weight = np.concatenate([fsc_shell_weights(curve, "full"), [0.0]])
    vol = torch.as_tensor(maps["full"], dtype=torch.float64)
    d = vol.shape[-1]
    shell = torch.round(radius_3d(d)).long().clamp(max=len(weight) - 1)
    w = torch.as_tensor(weight)[shell]
    return ifft3c(fft3c(vol) * w).real.float().numpy(), curve


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

