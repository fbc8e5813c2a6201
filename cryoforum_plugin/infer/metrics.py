"""Accuracy of predicted orientations against a ground truth (symmetry-aware geodesic error)."""

from __future__ import annotations

import numpy as np

from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.particles import ParticleSet


def match_rows(pred: ParticleSet, truth: ParticleSet) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into pred, into truth) of the same particles, matched by uid, else by image (path, index)."""
    def keys(ps):
        return [f"{p}#{i}" for p, i in zip(ps.image_path, ps.image_index)]

    for a, b in ((pred.uid, truth.uid), (keys(pred), keys(truth))):
        lookup = {k: i for i, k in enumerate(b)}
        rows = [(i, lookup[k]) for i, k in enumerate(a) if k in lookup]
        if rows:
            r = np.array(rows)
            return r[:, 0], r[:, 1]
    raise CryoforumError("no particle of the prediction is in the truth file (by uid or image name).",
                         path=truth.path, fix="pass the truth file of the same particle set.")


def geodesic_errors(pred_quat, true_quat, sym: str = "C1") -> np.ndarray:
    """(N,) symmetry-aware geodesic errors in radians."""
    return symmetry.symmetric_geodesic(np.asarray(pred_quat), np.asarray(true_quat), symmetry.group_quats(sym))


def summarize(err: np.ndarray, sym: str = "C1") -> dict:
    """Median, mean and percentiles in radians and degrees, with the chance level for the group."""
    if len(err) == 0:
        return {"n": 0}
    pct = {p: float(np.percentile(err, p)) for p in (10, 25, 50, 75, 90)}
    return {"n": int(len(err)), "median_rad": float(np.median(err)), "mean_rad": float(np.mean(err)),
            "median_deg": float(np.degrees(np.median(err))), "mean_deg": float(np.degrees(np.mean(err))),
            "percentiles_rad": pct, "percentiles_deg": {p: float(np.degrees(v)) for p, v in pct.items()},
            "fraction_below_5deg": float(np.mean(err < np.radians(5))),
            "fraction_below_15deg": float(np.mean(err < np.radians(15))),
            "chance_median_rad": symmetry.chance_median_error(sym, 4000), "sym": symmetry.canonical_name(sym)}
