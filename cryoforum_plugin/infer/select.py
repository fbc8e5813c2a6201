"""Uncertainty-driven clean-up: choose which particles to keep, and measure whether the uncertainty means
something (Spearman, risk-coverage, AUROC, junk detection)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.columns import JUNK_COLUMN, REFINE_CS, REFINE_STAR, UNCERTAINTY_STAR
from cryoforum_plugin.formats.particles import ParticleSet

__all__ = ["JUNK_COLUMN", "STATISTICS", "read_uncertainty", "resolve_statistic", "uncertainty_score",
           "keep_by_quantile", "calibrate_threshold", "spearman", "risk_coverage", "auroc"]

STATISTICS = ("trace", "max", "both", "refine", "refine_trace", "mismatch")
"""The selection statistics ``uncertainty_score`` computes; ``auto`` (resolve_statistic) picks one of them."""
MISMATCH_KEYS = ("cc_low", "sector")
"""The refinement's mismatch measures (refine/mismatch.py) the ``mismatch`` statistic ranks."""


def read_uncertainty(ps: ParticleSet, sidecar=None) -> dict[str, np.ndarray]:
    """{'max', 'trace', 'fom'} per particle from the set's typed fields (``fom`` zeros where the set has none);
    after a refinement also 'refine' (its confidence) and, after one against a map, 'cc_low' and 'sector'.

    For a .cs prediction the uid-keyed sidecar is loaded into those fields (cs_io) when ``sidecar`` is given, or
    when the .cs itself carries no uncertainty (``<stem>_uncertainty.cs`` beside it)."""
    if ps.file_format == "cs" and (sidecar is not None or ps.uncertainty is None):
        from cryoforum_plugin.formats.cs import attach_uncertainty_sidecar

        attach_uncertainty_sidecar(ps, sidecar)
    if ps.uncertainty is None:
        raise CryoforumError(f"no uncertainty columns ({UNCERTAINTY_STAR['trace']}).", path=ps.path,
                             fix="filter the output of `cryoforum predict` (predicted.star / predicted.cs).")
    fom = ps.fom if ps.fom is not None else np.zeros(len(ps))
    out = {"max": ps.uncertainty["max"], "trace": ps.uncertainty["trace"], "fom": fom}
    out.update(refine_columns(ps))
    return out


def refine_column(ps: ParticleSet, key: str) -> np.ndarray | None:
    """(N,) the refinement's per-particle ``key`` column (columns.REFINE_STAR), None where the set has none."""
    for name in (REFINE_STAR[key], REFINE_CS[key]):
        values = ps.column(name)
        if values is not None:
            return np.asarray(values, dtype=np.float64)
    return None


def refine_confidence(ps: ParticleSet) -> np.ndarray | None:
    """(N,) the refinement's per-particle confidence in [0, 1] (refine/driver.py), None for unrefined sets."""
    return refine_column(ps, "confidence")


def refine_columns(ps: ParticleSet) -> dict[str, np.ndarray]:
    """The refinement's columns of ``ps`` that the statistics use: 'refine' (its confidence), 'cc_low' and
    'sector' (refine/mismatch.py), each only where the set has it."""
    out = {"refine": refine_confidence(ps), **{k: refine_column(ps, k) for k in MISMATCH_KEYS}}
    return {k: v for k, v in out.items() if v is not None}


def resolve_statistic(unc: dict, statistic: str, threshold: float | None = None) -> str:
    """The statistic ``auto`` stands for: 'mismatch' when ``unc`` (read_uncertainty) holds the mismatch measures
    (the set was refined against a map), else 'trace'; with a ``threshold`` (--threshold: a value on the scale of
    the dispersions, <= 0) always 'trace', so a threshold keeps its meaning. Any other name is returned as it is."""
    if statistic != "auto":
        return statistic
    return "mismatch" if threshold is None and all(k in unc for k in MISMATCH_KEYS) else "trace"


def uncertainty_score(unc: dict, statistic: str) -> np.ndarray:
    """Higher = more uncertain. 'trace' / 'max': the dispersion itself (<= 0, near 0 uncertain); 'both': the mean
    of the two percentile ranks; 'refine': 1 - the refinement's confidence; 'refine_trace': the mean of the
    percentile ranks of 'refine' and 'trace'; 'mismatch': the larger of the percentile ranks of the refinement's
    'cc_low' and 'sector' (refine/mismatch.py); 'auto': resolve_statistic's choice. The rank-based statistics rank
    within ``unc``'s particles."""
    statistic = resolve_statistic(unc, statistic)
    if statistic == "mismatch":
        missing = [REFINE_STAR[k] for k in MISMATCH_KEYS if k not in unc]
        if missing:
            raise CryoforumError(f"--statistic mismatch needs the refinement's mismatch columns ({', '.join(missing)}"
                                 " missing).", fix="filter the output of a job or `cryoforum refine` that refined "
                                                   "against a map, or use --statistic trace.")
        n = len(unc["cc_low"])
        return np.maximum(stats.rankdata(unc["cc_low"]), stats.rankdata(unc["sector"])) / n
    if statistic in ("trace", "max"):
        return unc[statistic]
    if statistic == "both":
        return (stats.rankdata(unc["trace"]) + stats.rankdata(unc["max"])) / (2 * len(unc["trace"]))
    if statistic in ("refine", "refine_trace"):
        if "refine" not in unc:
            raise CryoforumError(f"--statistic {statistic} needs the refinement's confidence "
                                 f"({REFINE_STAR['confidence']}).",
                                 fix="filter the output of `cryoforum refine`, or use --statistic trace.")
        score = 1.0 - unc["refine"]
        if statistic == "refine":
            return score
        return (stats.rankdata(score) + stats.rankdata(unc["trace"])) / (2 * len(score))
    raise CryoforumError(f"unknown statistic '{statistic}'.", fix=f"use auto or one of {', '.join(STATISTICS)}.")


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
