"""The reference map of a refinement on the particles' grid, and the gold-standard filter of its half-maps.

The reference is resampled in Fourier space to the particles' pixel size and padded/cropped to their box. With
half-maps (gold standard), each half is Wiener-filtered by the half-map FSC per shell (weights in [0, 1]), which
keeps its noisy high-resolution shells from dominating the score. A single map given with half-maps
({'map', 'half1', 'half2'}: a consensus map and the half-maps of the model's training particles) is filtered the
same way by their FSC: unfiltered to Nyquist, a consensus map of 2,000 particles at SNR 0.1 led the refinement of
new particles to 2.5° median, FSC-weighted to 1.7° (benchmarks/RESULTS.md, section 7). A single map alone is used
as given (pass ``resolution_A`` to ``refine`` to low-pass it).
"""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fsc import fsc_curve, fsc_shell_weights
from cryoforum_plugin.physics.resample import map_on_particle_grid


def prepare_reference(reference, reference_pixel_size: float, box: int, apix: float,
                      device) -> tuple[dict[int, torch.Tensor], np.ndarray | None]:
    """({1: map, 2: map}, per-shell filter or None): box³ tensors at the particles' ``apix`` Å/px on ``device``,
    and the weights every projection of them gets (``fsc_filter``), from ``reference``: one (D, D, D) map (both keys
    the same tensor, no filter), {'half1': map, 'half2': map} (gold standard: each half filtered by their FSC) or
    {'map': map, 'half1': map, 'half2': map} (one map filtered by the FSC of the half-maps given with it), all at
    ``reference_pixel_size`` Å/px."""
    if isinstance(reference, dict):
        missing = [k for k in ("half1", "half2") if k not in reference]
        if missing:
            raise CryoforumError(f"the reference dict lacks {', '.join(missing)}.",
                                 fix="pass one map, or {'half1': map, 'half2': map} for gold-standard refinement.")
    if not reference_pixel_size or not np.isfinite(reference_pixel_size) or reference_pixel_size <= 0:
        raise CryoforumError(f"invalid reference pixel size {reference_pixel_size}.",
                             fix="pass the map's pixel size in Å (reference_pixel_size).")

    def on_grid(vol):
        return map_on_particle_grid(vol, box, apix, reference_pixel_size, device, what="reference")

    if not isinstance(reference, dict):
        one = on_grid(reference)
        return {1: one, 2: one}, None
    halves = {1: on_grid(reference["half1"]), 2: on_grid(reference["half2"])}
    shell_filter = fsc_filter(halves[1], halves[2])
    if "map" in reference:
        one = on_grid(reference["map"])
        return {1: one, 2: one}, shell_filter
    return halves, shell_filter


def fsc_filter(half1: torch.Tensor, half2: torch.Tensor) -> np.ndarray:
    """Per-shell Wiener weights (D//2 + 2 shells, in [1e-3, 1], shell 0 = 1) of a half-map, the FSC of two
    (D, D, D) half-maps (``fsc_shell_weights(..., "half")``)."""
    filt = np.maximum(fsc_shell_weights(fsc_curve(half1.cpu(), half2.cpu()), "half"), 1e-3)
    filt = np.concatenate([filt, [filt[-1]] * 2])
    filt[0] = 1.0
    return filt
