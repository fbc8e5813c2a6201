"""How badly the reference explains a particle at low resolution: the two measures of the ``mismatch`` selection
statistic (infer/select.py), computed by the refinement at each particle's refined pose, shift and CTF.

On the Fourier shells 1 <= |k| <= box·apix / RESOLUTION_A (Fourier pixels), whitened as the refinement whitens
(1/N per shell, particle_terms.noise_weights):

- ``cc_low``: 1 - the normalised correlation of the image and CTF·projection there (the refinement's score,
  scoring.py, restricted to low resolution: ice, carbon, crystals and empty picks add low-resolution power the
  projection does not explain);
- ``sector``: the whitened low-resolution residual (image - a·CTF·projection, ``a`` fitted) outside the
  projection's support (its band-limited density above SUPPORT_LEVEL of its peak, dilated by DILATE_PX), its mean
  power in SECTORS angular sectors around the box centre, largest / smallest (a neighbour or the second particle
  of an aggregate puts density in one side of the box).

High = junk for both. The constants are those benchmarks/junk_features.py measured with (benchmarks/RESULTS.md 7f);
that benchmark uses ``full_grid_features`` below.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.fourier import fft2c, ifft2c, radius_2d
from cryoforum_plugin.physics.noise import shell_index
from cryoforum_plugin.refine.scoring import HalfPlaneCoefficients, ParticleTerms

RESOLUTION_A = 23.0  # the low-resolution band's limit (12 Fourier px on a 64-px, 4.35 Å/px set)
SUPPORT_LEVEL = 0.15  # the projection's support: its band-limited density above this fraction of its peak
DILATE_PX = 3  # the support is dilated by this many pixels (a square of 2·DILATE_PX + 1)
SECTORS = 8  # angular sectors of the residual outside the support


def band_radius(box: int, apix: float) -> float:
    """The low band's outer radius in Fourier pixels of a ``box``-px image at ``apix`` Å/px."""
    return box * apix / RESOLUTION_A


def sector_index(box: int, device=None) -> torch.Tensor:
    """(box, box) long: the angular sector (0 .. SECTORS-1) of every pixel around the box centre."""
    f = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    angle = torch.atan2(f[:, None].expand(box, box), f[None, :].expand(box, box))
    return ((angle + np.pi) / (2 * np.pi) * SECTORS).long() % SECTORS


def band_weights(whiten: torch.Tensor, coef: HalfPlaneCoefficients, radius: float) -> torch.Tensor:
    """(box, box) on the centred Fourier grid: the refinement's 1/N (``whiten``, (K,) on ``coef``'s list, one
    value per shell round(|k|)) where 1 <= |k| <= ``radius`` Fourier pixels (at most ``coef.r_max``), 0 elsewhere."""
    radius = min(radius, coef.r_max)
    per_shell = torch.zeros(int(coef.shell.max()) + 2, dtype=whiten.dtype, device=whiten.device)
    per_shell[coef.shell] = whiten
    r = radius_2d(coef.box, whiten.device)
    shells = shell_index(coef.box, whiten.device).clamp(max=len(per_shell) - 1)
    return per_shell[shells] * ((r >= 1) & (r <= radius))


def low_band_cc(template: torch.Tensor, data: ParticleTerms, coef: HalfPlaneCoefficients,
                shift: torch.Tensor) -> torch.Tensor:
    """``cc_low`` (B,) from the refinement's own terms: (B, k) templates at the refined poses over the first k
    coefficients (the low band), the particles' ``data`` and their refined (B, 2) shifts in pixels."""
    k = template.shape[-1]
    num = (torch.conj(template) * data.y[:, :k] * coef.phase(shift, k)).real.sum(-1)
    den = (template.abs() ** 2 * data.c2w[:, :k]).sum(-1)
    return 1.0 - num / torch.sqrt((den * data.xw[:, k - 1]).clamp(min=1e-30))


def full_grid_features(images: torch.Tensor, ctf: torch.Tensor | None, projection: torch.Tensor, w: torch.Tensor,
                       sectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D, D) images, CTFs (centred Fourier grid; None: no CTF), shifted projections (real space, no CTF), the
    (D, D) whitening 1/N of the band (0 outside it, ``band_weights``) and ``sector_index`` -> (B,) ``cc_low`` and
    (B,) ``sector`` (module docstring) on the full grid."""
    return transform_features(fft2c(images), ctf, projection, w, sectors)


def transform_features(x: torch.Tensor, ctf: torch.Tensor | None, projection: torch.Tensor, w: torch.Tensor,
                       sectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``full_grid_features`` from the images' (B, D, D) centred Fourier transforms ``x`` (the refinement has
    them already)."""
    p = fft2c(projection)
    m = p if ctf is None else ctf * p
    num = (torch.conj(m) * x).real.mul(w).sum((1, 2))
    den = (m.abs() ** 2 * w).sum((1, 2)).clamp(min=1e-30)
    xx = (x.abs() ** 2 * w).sum((1, 2)).clamp(min=1e-30)
    cc = num / torch.sqrt(den * xx)
    residual = ifft2c((x - (num / den)[:, None, None] * m) * torch.sqrt(w)).real  # whitened, band-limited
    density = ifft2c(p * (w > 0)).real  # the projection on the same band
    support = (density > SUPPORT_LEVEL * density.amax((1, 2), keepdim=True)).float()[:, None]
    outside = torch.nn.functional.max_pool2d(support, 2 * DILATE_PX + 1, 1, DILATE_PX)[:, 0] == 0
    power = torch.stack([((residual**2) * (outside & (sectors == s))).sum((1, 2))
                         / (outside & (sectors == s)).sum((1, 2)).clamp(min=1) for s in range(SECTORS)], 1)
    return 1.0 - cc, power.amax(1) / power.amin(1).clamp(min=1e-12)


def particle_mismatch(projector, coef: HalfPlaneCoefficients, data: ParticleTerms, ft: torch.Tensor,
                      ctf: torch.Tensor | None, quat: torch.Tensor, shift: torch.Tensor, whiten: torch.Tensor,
                      radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) ``cc_low`` and (B,) ``sector`` of B particles at their refined (B, 4) ``quat`` and (B, 2) ``shift``
    (pixels): ``data`` their refinement terms, ``ft`` (B, D, D) the images' centred Fourier transforms, ``ctf``
    (B, D, D) on the same grid (None: no CTF), ``whiten`` (K,) the refinement's 1/N, ``radius`` the band
    (``band_radius``, Fourier pixels)."""
    k = coef.count(min(radius, coef.r_max))
    mats = rotations.quat_to_matrix_torch(quat.to(torch.float64)).float()
    template = projector.sample_slices(mats, coef.kvec[:k], coef.r_max)  # the search's crop, no recrop
    cc_low = low_band_cc(template, data, coef, shift.float())
    projection = projector.project(quat, shift)
    _, sector = transform_features(ft, ctf, projection, band_weights(whiten, coef, radius),
                                   sector_index(coef.box, ft.device))
    return cc_low, sector
