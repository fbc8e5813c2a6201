"""Balanced sampling of viewing directions (--balance-views): real data sets have a few dominant views and rare
others, and a network trained on them uniformly learns the common views and little else. The sphere of viewing
directions is cut into near-equal bins (a Fibonacci sphere); every particle is drawn with a probability inversely
proportional to its bin's count, so every occupied bin is drawn equally often (stratified over viewing
directions; the in-plane angle plays no part). Poses are first reduced to the asymmetric unit of the point
group, so symmetry mates count as one view.
"""

from __future__ import annotations

import numpy as np

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry

PARTICLES_PER_BIN = 25  # bins are sized so that uniform views put about this many training particles in each
MIN_BINS, MAX_BINS = 12, 2000  # 12 bins ~ 60° apart, 2000 ~ 4.5° apart


def n_view_bins(n_particles: int, per_bin: int = PARTICLES_PER_BIN) -> int:
    """Number of viewing-direction bins for ``n_particles``: about ``per_bin`` per bin under uniform views,
    clipped to [MIN_BINS, MAX_BINS]."""
    return int(np.clip(round(n_particles / per_bin), MIN_BINS, MAX_BINS))


def view_bins(quat, sym: str, n_bins: int) -> np.ndarray:
    """(N,) int64: for each (N, 4) pose (quaternion of RELION's A), the nearest of ``n_bins`` near-uniform viewing
    directions (Fibonacci sphere) to its viewing direction, the pose reduced to the asymmetric unit of ``sym``."""
    d = rotations.viewing_direction(symmetry.reduce_to_asu(rotations.normalize(quat), sym))
    centres = rotations.viewing_direction(rotations.fibonacci_so3(n_bins, 1))
    out = np.empty(len(d), np.int64)
    for lo in range(0, len(d), 8192):  # bounded memory: (8192, n_bins) dot products at a time
        out[lo:lo + 8192] = np.argmax(d[lo:lo + 8192] @ centres.T, axis=1)
    return out


def view_balance_weights(quat, sym: str = "C1", per_bin: int = PARTICLES_PER_BIN) -> tuple[np.ndarray, dict]:
    """Sampling probabilities (N,) float64 (sum 1) that draw every occupied viewing-direction bin equally often:
    particle i gets 1 / (occupied bins × count of its bin). Also returns a record for config.json: bins,
    occupied bins, the largest bin's share of the particles."""
    n = len(quat)
    bins = view_bins(quat, sym, n_view_bins(n, per_bin))
    counts = np.bincount(bins)
    occupied = int((counts > 0).sum())
    weights = 1.0 / (occupied * counts[bins])
    record = {"bins": int(n_view_bins(n, per_bin)), "occupied": occupied,
              "largest_bin_fraction": round(float(counts.max()) / max(n, 1), 4)}
    return weights / weights.sum(), record
