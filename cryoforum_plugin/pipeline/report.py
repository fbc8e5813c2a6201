"""The report of a prediction against known poses, rendered from the numbers it is given (``evaluation``
computes them): figures under headings that say how to read them, a verdict and what to do next, report.json and a
self-contained report.html."""

from __future__ import annotations

import base64
import dataclasses
import html
import json
from pathlib import Path

import numpy as np

from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.pipeline.plots import plot_fsc, pyplot, save_png


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


@dataclasses.dataclass
class PerParticle:
    """What the figures draw for the M particles with known poses (rows matched to the truth)."""

    error: np.ndarray  # (M,) orientation error of the network's poses, radians
    uncertainty: dict  # statistic ('trace', 'max', and 'refine' after a refinement) -> (M,) values
    keep: np.ndarray  # (M,) bool: kept by the clean-up
    junk: np.ndarray  # (M,) int: 0 a particle, else the kind of simulated junk (sim.dataset.JUNK_KINDS)
    quat: np.ndarray  # (M, 4) the poses whose viewing directions are drawn (refined when refined)
    refined_error: np.ndarray | None = None  # (M,) orientation error after refinement, radians
    confidence: np.ndarray | None = None  # (M,) the refinement's confidence (1 = certain)


@dataclasses.dataclass
class FscCurves:
    """FSC curves of the maps from each set of poses: set name -> (box // 2,) correlation per shell."""

    curves: dict
    box: int  # px
    pixel_size: float  # Å
    against_truth: bool  # against the true map, else between half-maps


def figures(out: Path, particles: PerParticle, rc: dict) -> list[str]:
    """Scatter, risk-coverage, orientation-distribution (and refinement) PNGs; returns their file names.
    ``rc``: statistic -> risk-coverage curve (list of {"coverage", "median_error_rad"})."""
    err, unc, keep, junk = particles.error, particles.uncertainty, particles.keep, particles.junk
    err_refined, confidence = particles.refined_error, particles.confidence
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
    d = rotations.viewing_direction(particles.quat)
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


def write_report(out, summary: dict, particles: PerParticle, fsc: FscCurves | None = None) -> dict:
    """Render into ``out``: the figures of ``particles`` (and fsc.png with ``fsc``), report.json (``summary``)
    and report.html. Returns ``summary``."""
    out = Path(out)
    images = figures(out, particles, summary["risk_coverage"])
    if fsc is not None:
        plot_fsc(fsc.curves, fsc.box, fsc.pixel_size, out / "fsc.png",
                 title="FSC against the true map" if fsc.against_truth else "half-map FSC")
        images.append("fsc.png")
    write_text(out / "report.json", json.dumps(summary, indent=2, default=float))
    write_text(out / "report.html", _html(summary, images, out))
    return summary
