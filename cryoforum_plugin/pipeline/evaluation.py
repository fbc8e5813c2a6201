"""The ``report`` step: a prediction (and its refinement) against known poses. ``compare`` computes the numbers
(errors, how well the uncertainty ranks them, junk rejection), ``map_comparison`` the maps from each set of poses
and their FSC (the paper's Figure 4); ``pipeline.report`` renders both (figures, report.json, report.html)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import read_map, write_mrc
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.infer.metrics import geodesic_errors, match_rows, summarize
from cryoforum_plugin.infer.select import (
    auroc, keep_by_quantile, read_uncertainty, refine_columns, resolve_statistic, risk_coverage, spearman,
    uncertainty_score,
)
from cryoforum_plugin.physics.fsc import fsc_curve, resolution
from cryoforum_plugin.physics.reconstruct import reconstruct
from cryoforum_plugin.pipeline.report import FscCurves, PerParticle, write_report
from cryoforum_plugin.progress import Events
from cryoforum_plugin.runtime import resolve_device
from cryoforum_plugin.sim.dataset import JUNK_KINDS
from cryoforum_plugin.train.model_dir import ModelDir


@dataclasses.dataclass
class Comparison:
    """A prediction matched to known poses, M particles: the report's numbers (``summary``, JSON-able), the
    per-particle values its figures draw, and the matched sets (rows in the same order) the maps are made from."""

    summary: dict
    particles: PerParticle
    predicted: ParticleSet  # the M predicted particles with known poses
    truth: ParticleSet  # the same M particles at their true poses
    refined: ParticleSet | None  # the same M particles refined, when a refinement was given
    weights: np.ndarray  # (M,) figure of merit of the prediction (uncertainty weights of a reconstruction)


def compare(pred: ParticleSet, truth: ParticleSet, *, refined: ParticleSet | None = None, split: str = "all",
            split_uids=None, sym: str = "C1", statistic: str = "auto", drop: float = 0.25,
            error_threshold: float = 15.0) -> Comparison:
    """The predicted set ``pred`` (and its refinement ``refined``) against ``truth`` (matched by uid, else
    image): orientation errors (radians inside, degrees in the summary), Spearman / AUROC of each uncertainty
    statistic against the error (above ``error_threshold`` degrees) and the junk, the risk-coverage curves, what
    dropping the ``drop`` fraction by ``statistic`` keeps. ``split_uids``: restrict to these particles (the
    model's ``split`` part)."""
    pi, ti = match_rows(pred, truth)
    if split_uids is not None:
        sel = np.isin(pred.uid[pi], split_uids)
        pi, ti = pi[sel], ti[sel]
    unc_all = read_uncertainty(pred)
    ps_pred, ps_true = pred.subset(pi), truth.subset(ti)
    unc = {k: v[pi] for k, v in unc_all.items()}
    ps_ref = None
    if refined is not None:
        ri, pj = match_rows(refined, ps_pred)
        if len(pj) != len(ps_pred):
            raise CryoforumError(f"the refined file holds {len(pj)} of the {len(ps_pred)} predicted particles.",
                                 path=refined.path, fix="pass the output of `cryoforum refine` on the predicted file.")
        ps_ref = refined.subset(ri[np.argsort(pj)])  # in ps_pred's row order
        unc.update(refine_columns(ps_ref))
    err = geodesic_errors(ps_pred.quat, ps_true.quat, sym)
    junk = truth.junk[ti].astype(int) if truth.junk is not None else np.zeros(len(ti), int)
    good = junk == 0
    threshold = np.radians(error_threshold)
    metrics = {}
    err_ref = geodesic_errors(ps_ref.quat, ps_true.quat, sym) if ps_ref is not None else None
    for stat in ("trace", "max", "refine"):
        if stat not in unc:
            continue
        s = (1.0 - unc[stat]) if stat == "refine" else unc[stat]
        e = err_ref if stat == "refine" else err
        metrics[stat] = {"spearman_vs_error": spearman(s[good], e[good]) if good.sum() > 2 else float("nan"),
                         f"auroc_error_above_{error_threshold:g}deg": auroc(s[good], e[good] > threshold),
                         "auroc_junk": auroc(s, ~good)}
    statistic = resolve_statistic(unc, statistic)
    score = uncertainty_score(unc, statistic)
    keep = keep_by_quantile(score, drop)
    rc = {stat: risk_coverage(unc[stat][good], err[good]) for stat in ("trace", "max")}
    junk_detect = {"junk_particles": int((~good).sum()),
                   "junk_dropped_fraction": float((~keep[~good]).mean()) if (~good).any() else float("nan")}
    for k, name in JUNK_KINDS.items():
        if (junk == k).any():
            junk_detect[f"dropped_fraction_{name}"] = float((~keep[junk == k]).mean())
    better = max(("trace", "max"), key=lambda k: metrics[k]["spearman_vs_error"]
                 if np.isfinite(metrics[k]["spearman_vs_error"]) else -9)
    final_err = err_ref if err_ref is not None else err
    summary = {
        "input": f"{pred.path} vs {truth.path} ({split}, {len(pi)} particles, sym {sym})",
        "headline": {
            "particles": int(len(pi)), "good (non-junk) particles": int(good.sum()),
            "median error, good particles (deg)": round(float(np.degrees(np.median(err[good]))), 2),
            f"median error after dropping {drop:.0%} by {statistic}, good (deg)":
                round(float(np.degrees(np.median(final_err[keep & good]))), 2) if (keep & good).any() else None,
            "better statistic (Spearman)": better,
            "Spearman (better statistic vs error)": round(metrics[better]["spearman_vs_error"], 3),
            "junk dropped at this fraction": round(junk_detect["junk_dropped_fraction"], 3)},
        "errors_all": summarize(err, sym), "errors_good": summarize(err[good], sym),
        "errors_kept_good": summarize(final_err[keep & good], sym), "statistics": metrics,
        "risk_coverage": rc, "junk": junk_detect, "drop": drop, "statistic": statistic}
    if err_ref is not None:
        summary["errors_refined_good"] = summarize(err_ref[good], sym)
        summary["headline"]["median error after refinement, good particles (deg)"] = round(
            float(np.degrees(np.median(err_ref[good]))), 2)
        shift_px = np.linalg.norm(ps_ref.shift_A - ps_true.shift_A, axis=1) / ps_ref.pixel_size
        summary["shift_error_refined_px"] = float(np.median(shift_px[good]))
    particles = PerParticle(err, unc, keep, junk, (ps_ref if ps_ref is not None else ps_pred).quat, err_ref,
                            unc.get("refine"))
    return Comparison(summary, particles, ps_pred, ps_true, ps_ref, unc_all["fom"][pi])


def read_true_map(path, box: int) -> np.ndarray | None:
    """The true map at ``path`` (None without one), refused unless it is ``box`` px like the particles."""
    if not path:
        return None
    vol = read_map(path)[0]
    if vol.shape[0] != box:
        raise CryoforumError(f"the map is {vol.shape[0]} px but the particles are {box} px.",
                             path=path, fix="pass the true map at the particles' box and pixel size "
                                            "(e.g. relion_image_handler --new_box / --rescale_angpix).")
    return vol


def map_comparison(out: Path, comparison: Comparison, sym: str, truth_map: np.ndarray | None, device,
                   events: Events | None = None) -> tuple[dict, FscCurves]:
    """Maps with true poses, predicted poses, predicted + filtered, predicted + uncertainty-weighted (and refined,
    refined + filtered), written as ``out``/map_NAME.mrc; FSC against ``truth_map`` (0.5, 0.143; box³ voxels)
    and half-map FSC (0.143). Returns ({set name: {'particles', resolutions in Å, 'seconds'}}, the FSC curves
    per set: against the true map when given, else between the half-maps)."""
    ps_true, ps_pred, ps_ref = comparison.truth, comparison.predicted, comparison.refined
    keep = comparison.particles.keep
    box, apix = int(ps_pred.box[0]), float(ps_pred.pixel_size[0])
    sets = {"true poses": (ps_true, None), "predicted": (ps_pred, None),
            "predicted, filtered": (ps_pred.subset(keep), None),
            "predicted, uncertainty-weighted": (ps_pred, comparison.weights)}
    if ps_ref is not None:
        sets.update({"refined": (ps_ref, None), "refined, filtered": (ps_ref.subset(keep), None)})
    results, curves = {}, {}
    for name, (ps, w) in sets.items():
        t0 = time.time()
        maps = reconstruct(ps, sym=sym, weights=w, halves=True, device=device, progress=False, events=events)
        slug = name.replace(", ", "_").replace(" ", "_")
        write_mrc(out / f"map_{slug}.mrc", maps["full"], apix)
        half = fsc_curve(maps["half1"], maps["half2"])
        r = {"particles": int(len(ps) if w is None else (np.asarray(w) > 0).sum()),
             "half_map_fsc_0.143_A": resolution(half, box, apix, 0.143), "seconds": round(time.time() - t0, 1)}
        if truth_map is not None:
            c = fsc_curve(maps["full"], truth_map)
            r["fsc_vs_truth_0.5_A"] = resolution(c, box, apix, 0.5)
            r["fsc_vs_truth_0.143_A"] = resolution(c, box, apix, 0.143)
            curves[name] = c
        else:
            curves[name] = half
        results[name] = r
    return results, FscCurves(curves, box, apix, against_truth=truth_map is not None)


def report(predicted: ParticleSet, truth: ParticleSet, out, *, refined: ParticleSet | None = None, true_map=None,
           model_dir=None, split: str = "all", sym: str = "C1", statistic: str = "auto", drop: float = 0.25,
           error_threshold: float = 15.0, reconstruct_maps: bool = True, device="auto",
           events: Events | None = None) -> dict:
    """Write report.html, report.json, figures and (with ``reconstruct_maps``) maps into ``out`` for
    ``predicted`` (and its refinement ``refined``) against ``truth``; ``split`` (train / val / test) of the
    model in ``model_dir`` restricts it to that part; ``true_map``: the true map's path, for FSC against it.
    Returns the summary (report.json)."""
    uids = ModelDir(model_dir).split_uids(split) if split != "all" and model_dir else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = compare(predicted, truth, refined=refined, split=split, split_uids=uids, sym=sym,
                         statistic=statistic, drop=drop, error_threshold=error_threshold)
    fsc = None
    if reconstruct_maps:
        vol = read_true_map(true_map, int(comparison.predicted.box[0]))
        comparison.summary["reconstructions"], fsc = map_comparison(out, comparison, sym, vol,
                                                                    resolve_device(device), events)
    return write_report(out, comparison.summary, comparison.particles, fsc)
