"""Uncertainty-driven clean-up: choose which particles to keep, and measure whether the uncertainty means
something (Spearman, risk-coverage, AUROC, junk detection)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from .errors import CryoforumError
from .particles import ParticleSet
from .uncertainty import FOM_COLUMN, STAR_COLUMNS

JUNK_COLUMN = "rlnCryoforumJunk"


def read_uncertainty(ps: ParticleSet, sidecar=None) -> dict[str, np.ndarray]:
    """{'max', 'trace', 'fom'} per particle: STAR columns, or the uid-keyed sidecar of a .cs prediction
    (``<stem>_uncertainty.cs`` beside it unless ``sidecar`` is given)."""
    table = ps.source.get("particles")
    if table is not None and STAR_COLUMNS["trace"] in table:
        out = {k: table[c].to_numpy(dtype=np.float64) for k, c in STAR_COLUMNS.items()}
        out["fom"] = table[FOM_COLUMN].to_numpy(dtype=np.float64) if FOM_COLUMN in table else np.zeros(len(ps))
        return out
    if ps.source.get("format") == "cs":
        from cryosparc.dataset import Dataset

        path = Path(sidecar) if sidecar else Path(ps.path).with_name(Path(ps.path).stem + "_uncertainty.cs")
        if not path.exists():
            raise CryoforumError("no uncertainty sidecar for this .cs prediction.", path=path,
                                 fix="pass the predicted_uncertainty.cs written by `cryoforum predict` (--uncertainty).")
        side = Dataset.load(str(path))
        lookup = {int(u): i for i, u in enumerate(side["uid"])}
        idx = np.array([lookup.get(int(u), -1) for u in ps.uid])
        if (idx < 0).any():
            r = int(np.argmax(idx < 0))
            raise CryoforumError(f"particle uid {int(ps.uid[r])} is not in the uncertainty sidecar.", path=path,
                                 row=r, fix="use the sidecar written together with this prediction.")
        return {"max": np.asarray(side["cryoforum/max_dispersion"], np.float64)[idx],
                "trace": np.asarray(side["cryoforum/trace_dispersion"], np.float64)[idx],
                "fom": np.asarray(side["cryoforum/fom"], np.float64)[idx]}
    raise CryoforumError(f"no uncertainty columns ({STAR_COLUMNS['trace']}).", path=ps.path,
                         fix="filter the output of `cryoforum predict` (predicted.star / predicted.cs).")


def uncertainty_score(unc: dict, statistic: str) -> np.ndarray:
    """Higher = more uncertain. 'trace' / 'max': the dispersion itself (<= 0, near 0 uncertain); 'both': the mean
    of the two percentile ranks."""
    if statistic in ("trace", "max"):
        return unc[statistic]
    if statistic == "both":
        return (stats.rankdata(unc["trace"]) + stats.rankdata(unc["max"])) / (2 * len(unc["trace"]))
    raise CryoforumError(f"unknown statistic '{statistic}'.", fix="use trace, max or both.")


def keep_by_quantile(score: np.ndarray, drop: float) -> np.ndarray:
    """Keep mask dropping the fraction ``drop`` with the highest (most uncertain) scores."""
    if not 0 <= drop < 1:
        raise CryoforumError(f"--drop {drop} is outside [0, 1).", fix="pass a fraction such as 0.25.")
    n_drop = int(round(drop * len(score)))
    keep = np.ones(len(score), bool)
    if n_drop:
        keep[np.argsort(-score, kind="stable")[:n_drop]] = False
    return keep


def calibrate_threshold(score: np.ndarray, error: np.ndarray, target: float) -> float | None:
    """The largest score threshold such that particles with score <= threshold have a median error <= target
    (on a set with known errors, e.g. the validation split); None if no threshold reaches the target."""
    order = np.argsort(score)
    s, e = score[order], error[order]
    best = None
    running = []
    import bisect

    for k in range(len(s)):  # incremental median over the most confident k+1 particles
        bisect.insort(running, e[k])
        if k >= 9 and running[len(running) // 2] <= target:
            best = float(s[k])
    return best


def spearman(score: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation (positive: more uncertain particles have larger errors)."""
    return float(stats.spearmanr(score, error).statistic)


def risk_coverage(score: np.ndarray, error: np.ndarray, points: int = 20) -> list[dict]:
    """Median error of the most confident particles against the fraction kept."""
    order = np.argsort(score, kind="stable")
    out = []
    for cov in np.linspace(1.0 / points, 1.0, points):
        k = max(1, int(round(cov * len(order))))
        out.append({"coverage": float(cov), "median_error_rad": float(np.median(error[order[:k]]))})
    return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for detecting ``positive`` (Mann-Whitney); NaN if one class is empty."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
