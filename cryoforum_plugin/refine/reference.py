"""The reference map of a refinement on the particles' grid, and the gold-standard filter of its half-maps.

The reference is resampled in Fourier space to the particles' pixel size and padded/cropped to their box. With
half-maps (gold standard), each half is Wiener-filtered by the half-map FSC per shell (weights in [0, 1]), which
keeps its noisy high-resolution shells from dominating the score; a single map is used as given (pass
``resolution_A`` to ``refine`` to low-pass it).
"""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fsc import fsc_curve, fsc_shell_weights
from cryoforum_plugin.physics.resample import map_on_particle_grid


def prepare_reference(reference, reference_pixel_size: float, box: int, apix: float, device) -> dict:
    """{1: map, 2: map} (box³ tensors at the particles' ``apix`` Å/px, on ``device``) from one map (both keys the
    same tensor) or {'half1': map, 'half2': map}."""
    if isinstance(reference, dict):
        missing = [k for k in ("half1", "half2") if k not in reference]
        if missing:
            raise CryoforumError(f"the reference dict lacks {', '.join(missing)}.",
                                 fix="pass one map, or {'half1': map, 'half2': map} for gold-standard refinement.")
        maps = {1: reference["half1"], 2: reference["half2"]}
    else:
        maps = {1: reference, 2: reference}
    if not reference_pixel_size or not np.isfinite(reference_pixel_size) or reference_pixel_size <= 0:
        raise CryoforumError(f"invalid reference pixel size {reference_pixel_size}.",
                             fix="pass the map's pixel size in Å (reference_pixel_size).")

    def on_grid(vol):
        return map_on_particle_grid(vol, box, apix, reference_pixel_size, device, what="reference")

    out = {1: on_grid(maps[1])}
    out[2] = out[1] if maps[2] is maps[1] else on_grid(maps[2])
    return out


def half_map_filter(maps: dict[int, torch.Tensor]) -> np.ndarray | None:
    """Per-shell Wiener weights (D//2 + 2 shells, in [1e-3, 1], shell 0 = 1) from the half-map FSC of
    ``prepare_reference``'s maps; None for a single map."""
    if maps[2] is maps[1]:
        return None
    filt = np.maximum(fsc_shell_weights(fsc_curve(maps[1].cpu(), maps[2].cpu()), "half"), 1e-3)
    filt = np.concatenate([filt, [filt[-1]] * 2])
    filt[0] = 1.0
    return filt
