"""Per-particle uncertainty from the Bingham parameter A's eigenvalues λ1 <= λ2 <= λ3 <= λ4 (the paper).

Dispersions λ1 - λk (k = 2, 3, 4) are <= 0: near 0 a flat Bingham (uncertain), large magnitude a
concentrated one (confident). Eq. 6 (max dispersion) = λ1 - λ2; eq. 7 (trace) = 3λ1 - λ2 - λ3 - λ4.
"""

from __future__ import annotations

import numpy as np

STATISTICS = ("trace", "max")


def dispersions(evals) -> dict[str, np.ndarray]:
    """(N, 4) ascending eigenvalues -> {'max': eq. 6, 'trace': eq. 7}, each (N,) and <= 0."""
    ev = np.asarray(evals, dtype=np.float64)
    return {"max": ev[:, 0] - ev[:, 1], "trace": 3 * ev[:, 0] - ev[:, 1:].sum(1)}


def trace_scale(evals) -> float:
    """The figure of merit's scale: median |eq. 7 trace| over a set of (N, 4) eigenvalues (1.0 for none)."""
    if evals is None or len(evals) == 0:
        return 1.0
    return float(np.median(-dispersions(evals)["trace"])) or 1.0


def figure_of_merit(trace, scale: float) -> np.ndarray:
    """Confidence in [0, 1], higher = more confident: 1 - exp(trace / scale), ``scale`` = median |trace| on the
    validation set (stored with the model), so a typical validation particle scores 0.63."""
    return 1.0 - np.exp(np.asarray(trace, dtype=np.float64) / max(scale, 1e-12))
