"""The plausibility factor of the refinement's confidence, and which local results are doubtful.

The confidence of a particle is the posterior mass near its best pose (local_search.py, global_search.py) times a
plausibility in [0, 1] that falls from 1 to 0 as the final score goes from 2 to 4 robust SDs below the median of
the confident particles (a wrong pose or a junk particle matches much worse than its peers).
"""

from __future__ import annotations

import numpy as np

FALLBACK_CONFIDENCE = 0.6  # under "auto", local results below this confidence are searched globally too
MIN_CONFIDENT = 20  # fewer confident particles than this: the median is taken over all


def plausibility(cc: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """(N,) scores and confidences -> (N,): 1 for scores within 2 robust SDs (1.4826 MAD) below the median score of
    the confident particles, falling linearly to 0 at 4 SDs below."""
    ref = cc[conf >= FALLBACK_CONFIDENCE] if (conf >= FALLBACK_CONFIDENCE).sum() >= MIN_CONFIDENT else cc
    med = float(np.median(ref))
    sd = max(1.4826 * float(np.median(np.abs(ref - med))), 0.05 * abs(med), 1e-6)
    return np.clip((cc - (med - 4 * sd)) / (2 * sd), 0.0, 1.0)


def doubtful(conf: np.ndarray, plausible: np.ndarray) -> np.ndarray:
    """(N,) bool: a confidence below FALLBACK_CONFIDENCE or a score below the plausible range."""
    return (conf < FALLBACK_CONFIDENCE) | (plausible < 1)
