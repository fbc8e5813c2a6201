"""The report of a prediction against known poses: does the uncertainty mean something? Numbers,
reconstructions before/after filtering (the paper's Figure 4), figures and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np

from cryoforum_plugin.physics import rotations as geometry
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.infer.select import (
    auroc, keep_by_quantile, read_uncertainty, refine_confidence, risk_coverage, spearman, uncertainty_score,
)
from cryoforum_plugin.infer.metrics import geodesic_errors, match_rows, summarize
from cryoforum_plugin.physics.fsc import fsc_curve, resolution
from cryoforum_plugin.pipeline.plots import plot_fsc
from cryoforum_plugin.formats.mrc import read_map, write_mrc
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.pipeline.plots import pyplot, save_png
from cryoforum_plugin.physics.reconstruct import reconstruct
from cryoforum_plugin.sim.dataset import JUNK_KINDS
from cryoforum_plugin.runtime import resolve_device
from cryoforum_plugin.progress import Events


FIGURE_TEXT = {
    "uncertainty_vs_error.png": ("Does the network know when it is wrong?",
                                 "Each dot is a particle: its uncertainty (x; closer to 0 = less sure) against its "
                                 "true orientation error (y). A useful uncertainty puts the large errors on the right; "
                                 "simulated junk is red."),
    "risk_coverage.png": ("Error of the particles you keep",
                          "Median orientation error of the most confident particles as more are kept (x). A curve "
                          "that rises to the right means dropping the uncertain particles removes the bad poses."),
    "orientations.png": ("Viewing directions, kept and rejected",
                         "Predicted viewing directions (Mollweide projection of the sphere). Gaps in the kept set "
                         "mean the clean-up removed whole views: reconstruct with care."),
    "refinement.png": ("What the refinement against the map did",
                       "Left: orientation error before (network) and after refinement, per particle (log scale). "
                       "Right: the refinement's confidence (1 = one clear match; low = junk or an ambiguous view)."),
    "fsc.png": ("Resolution of maps from each set of poses",
                "Fourier shell correlation of reconstructions against the true map (or between half-maps). The "
                "further right a curve stays high, the better the poses; 'true poses' is the best achievable."),
}
"""Heading and how to read each figure of the report."""


def figures(out: Path, err, unc, keep, junk, rc, ps_pred, err_refined=None, confidence=None) -> list[str]:
    """Scatter, risk-coverage, orientation-distribution (and refinement) PNGs; returns their file names."""
    plt = pyplot()
    names = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, stat in zip(axes, ("trace", "max")):
        good = junk == 0
        ax.scatter(unc[stat][good], np.degrees(err[good]), s=3, alpha=0.4, label="particles")
        if (~good).any():
            ax.scatter(unc[stat][~good], np.degrees(err[~good]), s=6, c="red", alpha=0.6, label="simulated junk")
        ax.set_xlabel(f"{stat} dispersion (eq. {7 if stat == 'trace' else 6}; near 0 = uncertain)")
        ax.set_ylabel("error (degrees)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "uncertainty_vs_error.png")
    names.append("uncertainty_vs_error.png")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for stat, curve in rc.items():
        ax.plot([c["coverage"] for c in curve], [np.degrees(c["median_error_rad"]) for c in curve], label=stat)
    ax.set_xlabel("fraction of particles kept (most confident first)")
    ax.set_ylabel("median error of kept (degrees)")
    ax.legend()
    fig.tight_layout()
    save_png(fig, out / "risk_coverage.png")
    names.append("risk_coverage.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), subplot_kw={"projection": "mollweide"})
    d = geometry.viewing_direction(ps_pred.quat)
    lon, lat = np.arctan2(d[:, 1], d[:, 0]), np.arcsin(np.clip(d[:, 2], -1, 1))
    for ax, mask, title in zip(axes, (keep, ~keep), ("kept", "rejected")):
        ax.scatter(lon[mask], lat[mask], s=2, alpha=0.5)
        ax.set_title(f"{title} ({int(mask.sum())}): viewing directions", fontsize=9)
        ax.grid(True)
    fig.tight_layout()
    save_png(fig, out / "orientations.png")
    names.append("orientations.png")
    if err_refined is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        bins = np.logspace(-1, np.log10(180), 40)
        axes[0].hist(np.clip(np.degrees(err), 0.1, 180), bins=bins, alpha=0.6, label="network")
        axes[0].hist(np.clip(np.degrees(err_refined), 0.1, 180), bins=bins, alpha=0.6, label="refined")
        axes[0].set_xscale("log")
        axes[0].set_xlabel("orientation error (degrees)")
        axes[0].set_ylabel("particles")
        axes[0].legend()
        good = junk == 0
        axes[1].hist([confidence[good], confidence[~good]] if (~good).any() else [confidence[good]], bins=30,
                     stacked=True, label=["particles", "simulated junk"][: 2 if (~good).any() else 1])
        axes[1].set_xlabel("refinement confidence")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, out / "refinement.png")
        names.append("refinement.png")
    return names


def reconstructions(out: Path, ps_true, ps_pred, keep, weights, sym, true_map, device,
                    events: Events | None = None, ps_refined=None) -> tuple[dict, dict]:
    """Maps with true poses, predicted poses, predicted + filtered, predicted + uncertainty-weighted (and refined,
    refined + filtered); FSC against the true map (0.5, 0.143) and half-map FSC (0.143)."""
    box, apix = int(ps_pred.box[0]), float(ps_pred.pixel_size[0])
    sets = {"true poses": (ps_true, None), "predicted": (ps_pred, None),
            "predicted, filtered": (ps_pred.subset(keep), None), "predicted, uncertainty-weighted": (ps_pred, weights)}
    if ps_refined is not None:
        sets.update({"refined": (ps_refined, None), "refined, filtered": (ps_refined.subset(keep), None)})
    results, curves = {}, {}
    for name, (ps, w) in sets.items():
        t0 = time.time()
        maps = reconstruct(ps, sym=sym, weights=w, halves=True, device=device, progress=False, events=events)
        slug = name.replace(", ", "_").replace(" ", "_")
        write_mrc(out / f"map_{slug}.mrc", maps["full"], apix)
        half = fsc_curve(maps["half1"], maps["half2"])
        r = {"particles": int(len(ps) if w is None else (np.asarray(w) > 0).sum()),
             "half_map_fsc_0.143_A": resolution(half, box, apix, 0.143), "seconds": round(time.time() - t0, 1)}
        if true_map is not None:
            c = fsc_curve(maps["full"], true_map)
            r["fsc_vs_truth_0.5_A"] = resolution(c, box, apix, 0.5)
            r["fsc_vs_truth_0.143_A"] = resolution(c, box, apix, 0.143)
            curves[name] = c
        else:
            curves[name] = half
        results[name] = r
    plot_fsc(curves, box, apix, out / "fsc.png",
             title="FSC against the true map" if true_map is not None else "half-map FSC")
    return results, curves


def _deg(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.1f}°"


def _pct(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.0f} %"


def verdict(summary: dict) -> tuple[str, list[str]]:
    """(one-line verdict, what to do next) from the numbers of the report."""
    e = summary["errors_good"]
    final = summary.get("errors_refined_good") or e
    med = final.get("median_deg", float("nan"))
    what = "refined" if summary.get("errors_refined_good") else "predicted"
    if med <= 3:
        quality = "excellent: ready for high-resolution refinement"
    elif med <= 10:
        quality = "good: a local refinement will finish them"
    elif med <= 30:
        quality = "rough: use them as a starting point for a global refinement"
    else:
        quality = "near chance: do not use these poses"
    line = f"The {what} poses are {quality} (median error {_deg(med)} on {e['n']} particles with known poses)."
    nxt = []
    junk = summary["junk"]
    if junk["junk_particles"]:
        nxt.append(f"The clean-up dropped {_pct(summary['drop'])} of the particles, including "
                   f"{_pct(junk['junk_dropped_fraction'])} of the known junk.")
    if med <= 10:
        nxt.append("RELION: Refine3D from confident.star with local searches only (initial angular sampling 1.8°, "
                   "local searches from auto-sampling). cryoSPARC: Homogeneous or Non-uniform Refinement of the "
                   "'confident' particles with 'minimize over per-particle scale' and local searches.")
    else:
        nxt.append("RELION: Refine3D from confident.star with a global search (initial angular sampling 7.5°); "
                   "cryoSPARC: Homogeneous Refinement from the consensus map. Train longer or on more particles "
                   "(or from the map) before trusting the network's poses.")
    return line, nxt


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + \
        "</table>"


STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:980px;margin:2em auto;padding:0 1em;
color:#1d2327;line-height:1.45}h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;
padding-bottom:.2em}.verdict{background:#eef6ee;border-left:5px solid #2e7d32;padding:.8em 1em;font-size:1.1em}
.verdict.bad{background:#fdf0ef;border-left-color:#c62828}table{border-collapse:collapse;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.3em .7em;text-align:left}th{background:#f6f7f7;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1.2em 0}figcaption{color:#50575e;
font-size:.92em;margin-top:.3em}img{max-width:100%;border:1px solid #eee}.muted{color:#666;font-size:.9em}"""


def _html(summary: dict, images: list[str], out: Path) -> str:
    def img(name):
        data = base64.b64encode((out / name).read_bytes()).decode()
        title, text = FIGURE_TEXT.get(name, (name, ""))
        return (f'<figure><h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(text)}</figcaption></figure>')

    line, nxt = verdict(summary)
    e, k = summary["errors_good"], summary["errors_kept_good"]
    acc = [("particles with known poses", f"{summary['headline']['particles']} "
                                          f"({summary['headline']['good (non-junk) particles']} not junk)"),
           ("median / mean error, network", f"{_deg(e.get('median_deg'))} / {_deg(e.get('mean_deg'))}"),
           ("within 5° / 15°, network",
            f"{_pct(e.get('fraction_below_5deg'))} / {_pct(e.get('fraction_below_15deg'))}"),
           (f"median error after dropping {_pct(summary['drop'])} ({summary['statistic']})", _deg(k.get("median_deg")))]
    r = summary.get("errors_refined_good")
    if r:
        acc += [("median / mean error, refined", f"{_deg(r.get('median_deg'))} / {_deg(r.get('mean_deg'))}"),
                ("within 5° / 15°, refined", f"{_pct(r.get('fraction_below_5deg'))} / "
                                             f"{_pct(r.get('fraction_below_15deg'))}")]
        if summary.get("shift_error_refined_px") is not None:
            acc.append(("median shift error, refined", f"{summary['shift_error_refined_px']:.2f} px"))
    unc = [(f"{stat}: Spearman with the error / AUROC for junk",
            f"{m['spearman_vs_error']:.2f} / {m['auroc_junk']:.2f}") for stat, m in summary["statistics"].items()]
    unc.append(("known junk dropped", _pct(summary["junk"]["junk_dropped_fraction"])))
    rec = ""
    if summary.get("reconstructions"):
        rows = "".join(
            f"<tr><td>{html.escape(n)}</td><td class=num>{v['particles']}</td>"
            f"<td class=num>{v.get('fsc_vs_truth_0.143_A', float('nan')):.1f} Å</td>"
            f"<td class=num>{v.get('fsc_vs_truth_0.5_A', float('nan')):.1f} Å</td>"
            f"<td class=num>{v['half_map_fsc_0.143_A']:.1f} Å</td></tr>"
            for n, v in summary["reconstructions"].items())
        rec = ("<h2>Maps from each set of poses</h2><p>Resolution of a reconstruction from each set (lower is "
               "better; 'true poses' is the best these particles can give).</p><table><tr><th>poses</th>"
               "<th>particles</th><th>FSC 0.143 vs true map</th><th>FSC 0.5 vs true map</th>"
               f"<th>half-map FSC 0.143</th></tr>{rows}</table>")
    bad = (r or e).get("median_deg", 180) > 30
    return ("<!doctype html><html lang=en><head><meta charset='utf-8'><title>cryo-forum report</title>"
            f"<style>{STYLE}</style></head><body><h1>cryo-forum report</h1>"
            f"<p class=muted>{html.escape(summary['input'])}</p>"
            f"<p class='verdict{' bad' if bad else ''}'>{html.escape(line)}</p>"
            "<h2>What to do next</h2><ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in nxt) + "</ul>"
            "<h2>How good are the poses?</h2>" + _table(acc) +
            "<h2>Does the uncertainty mean something?</h2>" + _table(unc) + rec +
            "<h2>Figures</h2>" + "".join(img(n) for n in images) +
            "<h2>All numbers</h2><details><summary>report.json</summary><pre>"
            + html.escape(json.dumps(summary, indent=1, default=float)) + "</pre></details></body></html>")


def report(pred: ParticleSet, truth: ParticleSet, out, *, refined: ParticleSet | None = None, true_map=None,
           split: str = "all", split_uids=None, sym: str = "C1", statistic: str = "trace", drop: float = 0.25,
           error_threshold: float = 15.0, reconstruct_maps: bool = True, device="auto",
           events: Events | None = None) -> dict:
    """Write report.html, report.json, figures and maps into ``out`` for the predicted set ``pred`` (and its
    refinement ``refined``) against ``truth`` (matched by uid, else image); ``split_uids``: restrict to these
    particles (the model's ``split`` part); ``true_map``: path of the true map for FSC against it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
        confidence = refine_confidence(ps_ref)
        if confidence is not None:
            unc["refine"] = confidence
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
    images = figures(out, err, unc, keep, junk, rc, ps_ref if ps_ref is not None else ps_pred, err_ref,
                     unc.get("refine"))
    if reconstruct_maps:
        map_path, true_map = true_map, (read_map(true_map)[0] if true_map else None)
        if true_map is not None and true_map.shape[0] != int(ps_pred.box[0]):
            raise CryoforumError(f"the map is {true_map.shape[0]} px but the particles are {int(ps_pred.box[0])} px.",
                                 path=map_path, fix="pass the true map at the particles' box and pixel size "
                                                     "(e.g. relion_image_handler --new_box / --rescale_angpix).")
        weights = unc_all["fom"][pi]
        summary["reconstructions"], _ = reconstructions(out, ps_true, ps_pred, keep, weights, sym, true_map,
                                                        resolve_device(device), events, ps_ref)
        images.append("fsc.png")
    write_text(out / "report.json", json.dumps(summary, indent=2, default=float))
    write_text(out / "report.html", _html(summary, images, out))
    return summary
