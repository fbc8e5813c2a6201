"""The report of a prediction against known poses: does the uncertainty mean something? Numbers,
reconstructions before/after filtering (the paper's Figure 4), figures and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import numpy as np

from . import geometry
from .atomic import write_text
from .cleanup import auroc, keep_by_quantile, read_uncertainty, risk_coverage, spearman, uncertainty_score
from .evaluation import geodesic_errors, match_rows, summarize
from .fsc import fsc_curve, plot_fsc, resolution
from .images import read_map, write_mrc
from .errors import CryoforumError
from .particles import ParticleSet
from .plots import pyplot, save_png
from .reconstruction import reconstruct
from .simulation import JUNK_KINDS
from .devices import resolve_device
from .progress import Events


def figures(out: Path, err, unc, keep, junk, rc, ps_pred) -> list[str]:
    """Scatter, risk-coverage and orientation-distribution PNGs; returns their file names."""
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
        ax.set_title(f"{title} ({int(mask.sum())}): predicted viewing directions", fontsize=9)
        ax.grid(True)
    fig.tight_layout()
    save_png(fig, out / "orientations.png")
    names.append("orientations.png")
    return names


def reconstructions(out: Path, ps_true, ps_pred, keep, weights, sym, true_map, device,
                    events: Events | None = None) -> tuple[dict, dict]:
    """Maps with true poses, predicted poses, predicted + filtered, predicted + uncertainty-weighted;
    FSC against the true map (0.5) and half-map FSC (0.143)."""
    box, apix = int(ps_pred.box[0]), float(ps_pred.pixel_size[0])
    sets = {"true poses": (ps_true, None), "predicted": (ps_pred, None),
            "predicted, filtered": (ps_pred.subset(keep), None), "predicted, uncertainty-weighted": (ps_pred, weights)}
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


def _html(summary: dict, images: list[str], out: Path) -> str:
    def img(name):
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}" style="max-width:100%">'

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in summary["headline"].items())
    rec = ""
    if summary.get("reconstructions"):
        head = "".join(f"<th>{html.escape(k)}</th>" for k in next(iter(summary["reconstructions"].values())))
        body = "".join("<tr><td>" + html.escape(n) + "</td>" + "".join(f"<td>{v:.2f}</td>" if isinstance(v, float)
                                                                       else f"<td>{v}</td>" for v in r.values())
                       + "</tr>" for n, r in summary["reconstructions"].items())
        rec = f"<h2>Reconstructions (paper's Figure 4)</h2><table border=1><tr><th>set</th>{head}</tr>{body}</table>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>cryo-forum report</title></head><body>"
            f"<h1>cryo-forum uncertainty report</h1><p>{html.escape(summary['input'])}</p>"
            f"<table border=1>{rows}</table>{rec}" + "".join(f"<h3>{n}</h3>{img(n)}" for n in images)
            + "<h2>All numbers</h2><pre>" + html.escape(json.dumps(summary, indent=1)) + "</pre></body></html>")


def report(pred: ParticleSet, truth: ParticleSet, out, *, true_map=None, split: str = "all", split_uids=None,
           sym: str = "C1", statistic: str = "trace", drop: float = 0.25, error_threshold: float = 15.0,
           reconstruct_maps: bool = True, device="auto", events: Events | None = None) -> dict:
    """Write report.html, report.json, figures and maps into ``out`` for the predicted set ``pred`` against
    ``truth`` (matched by uid, else image); ``split_uids``: restrict to these particles (the model's ``split``
    part); ``true_map``: path of the true map for FSC against it. Returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pi, ti = match_rows(pred, truth)
    if split_uids is not None:
        sel = np.isin(pred.uid[pi], split_uids)
        pi, ti = pi[sel], ti[sel]
    unc_all = read_uncertainty(pred)
    ps_pred, ps_true = pred.subset(pi), truth.subset(ti)
    unc = {k: v[pi] for k, v in unc_all.items()}
    err = geodesic_errors(ps_pred.quat, ps_true.quat, sym)
    junk = truth.junk[ti].astype(int) if truth.junk is not None else np.zeros(len(ti), int)
    good = junk == 0
    threshold = np.radians(error_threshold)
    metrics = {}
    for stat in ("trace", "max"):
        s = unc[stat]
        metrics[stat] = {"spearman_vs_error": spearman(s[good], err[good]) if good.sum() > 2 else float("nan"),
                         f"auroc_error_above_{error_threshold:g}deg": auroc(s[good], err[good] > threshold),
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
    summary = {
        "input": f"{pred.path} vs {truth.path} ({split}, {len(pi)} particles, sym {sym})",
        "headline": {
            "particles": int(len(pi)), "good (non-junk) particles": int(good.sum()),
            "median error, good particles (deg)": round(float(np.degrees(np.median(err[good]))), 2),
            f"median error after dropping {drop:.0%} by {statistic}, good (deg)":
                round(float(np.degrees(np.median(err[keep & good]))), 2) if (keep & good).any() else None,
            "better statistic (Spearman)": better,
            "Spearman (better statistic vs error)": round(metrics[better]["spearman_vs_error"], 3),
            "junk dropped at this fraction": junk_detect["junk_dropped_fraction"]},
        "errors_all": summarize(err, sym), "errors_good": summarize(err[good], sym),
        "errors_kept_good": summarize(err[keep & good], sym), "statistics": metrics,
        "risk_coverage": rc, "junk": junk_detect, "drop": drop, "statistic": statistic}
    images = figures(out, err, unc, keep, junk, rc, ps_pred)
    if reconstruct_maps:
        map_path, true_map = true_map, (read_map(true_map)[0] if true_map else None)
        if true_map is not None and true_map.shape[0] != int(ps_pred.box[0]):
            raise CryoforumError(f"the map is {true_map.shape[0]} px but the particles are {int(ps_pred.box[0])} px.",
                                 path=map_path, fix="pass the true map at the particles' box and pixel size "
                                                     "(e.g. relion_image_handler --new_box / --rescale_angpix).")
        weights = unc_all["fom"][pi]
        summary["reconstructions"], _ = reconstructions(out, ps_true, ps_pred, keep, weights, sym, true_map,
                                                        resolve_device(device), events)
        images.append("fsc.png")
    write_text(out / "report.json", json.dumps(summary, indent=2, default=float))
    write_text(out / "report.html", _html(summary, images, out))
    return summary
