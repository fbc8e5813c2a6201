#!/usr/bin/env python3
"""Which per-particle statistic removes the most junk? Model-based candidates against the default ``trace``, on
finished runs of ``relion_job.py`` (how ``mismatch``, the jobs' default statistic since, was chosen).

    python benchmarks/junk_features.py --run benchmarks/out/relion_job --run benchmarks/out/relion_job_s6 \
        --json /tmp/junk_features.json                                    # ~15 s CPU (1 thread)

For every particle of a run's train job (External/job003, its validation split: where a default is chosen) and
predict job (External/job004, the new particles: held out), with the job's refined pose, shift and CTF, the
consensus map (project/consensus.mrc, the jobs' reference) is projected and compared with the image on the
shells 1 <= |k| <= box·apix / ``--resolution`` Fourier pixels, whitened by the set's mean power spectrum (the
refinement's default noise model, particle_terms.noise_weights without a spectrum). The definitions and constants
are the product's (cryoforum_plugin/refine/mismatch.py, whose refinement computes them as ``mismatch``):

- ``cc_low``: 1 - the normalised correlation of image and CTF·projection there (refine's score, scoring.py,
  restricted to low resolution: ice, carbon, crystals and empty picks add low-resolution power the projection
  does not explain, and a particle drowned in them correlates less);
- ``sector``: the whitened low-resolution residual (image - a·CTF·projection, ``a`` fitted) outside the
  projection's support (its low-passed density above mismatch.SUPPORT_LEVEL of its peak, dilated by
  mismatch.DILATE_PX), its mean power in mismatch.SECTORS angular sectors around the box centre, largest /
  smallest (a neighbour or the second particle of an aggregate puts density in one side of the box);
- ``max(cc_low, sector)``: the larger of the two percentile ranks (junk of either sort is flagged by either).

Each statistic (high = junk) is evaluated with ``selection.evaluate`` at ``--drop`` (AUROC for junk, junk removed
per kind, good kept), with the existing ones (trace, refine, the refinement's own score, relion_job.py's
trace+anisotropy candidate) for comparison. JSON (``--json``): per run and part, every statistic's row, and the
seconds per particle the two new statistics took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from relion_job import background_anisotropy  # noqa: E402
from selection import evaluate  # noqa: E402

from cryoforum_plugin.formats.columns import REFINE_STAR  # noqa: E402
from cryoforum_plugin.formats.mrc import StackReader  # noqa: E402
from cryoforum_plugin.formats.particles import ParticleSet  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.infer.select import read_uncertainty, uncertainty_score  # noqa: E402
from cryoforum_plugin.physics.ctf import ctf_images  # noqa: E402
from cryoforum_plugin.physics.fourier import radius_2d  # noqa: E402
from cryoforum_plugin.physics.noise import radial_power, shell_index  # noqa: E402
from cryoforum_plugin.physics.projector import Projector  # noqa: E402
from cryoforum_plugin.physics.resample import map_on_particle_grid  # noqa: E402
from cryoforum_plugin.refine.mismatch import RESOLUTION_A, full_grid_features, sector_index  # noqa: E402
from cryoforum_plugin.refine.particle_terms import whitening  # noqa: E402
from cryoforum_plugin.train.model_dir import ModelDir  # noqa: E402

TRAIN_JOB, PREDICT_JOB = "External/job003", "External/job004"  # relion_job.py's jobs


def set_power(ps: ParticleSet, reader: StackReader, batch: int = 500) -> np.ndarray:
    """(box//2 + 1,) the mean radial power spectrum of all of ``ps``'s images (noise.py's convention): the shape
    of the refinement's default noise model (its level does not matter to either statistic)."""
    power = 0.0
    for lo in range(0, len(ps), batch):
        rows = np.arange(lo, min(lo + batch, len(ps)))
        power = power + radial_power(torch.from_numpy(ps.read_images(reader, rows))).numpy() * len(rows)
    return power / len(ps)


@torch.no_grad()
def projection_features(ps: ParticleSet, volume: np.ndarray, map_pixel_size: float, resolution_A: float,
                        batch: int = 250) -> tuple[dict[str, np.ndarray], float]:
    """({'cc_low', 'sector'}: (N,) each, high = junk) for the refined poses, shifts and CTFs of ``ps`` against
    ``volume`` (a (D, D, D) map at ``map_pixel_size`` Å), and the CPU seconds per particle (this process's, images
    read and the projector set up included: wall time means little on a shared machine)."""
    apix, box = ps.require_one_sampling("junk features")
    reader = StackReader()
    t0 = time.process_time()
    projector = Projector(map_on_particle_grid(volume, box, apix, map_pixel_size, "cpu", what="reference"))
    radius = radius_2d(box)
    band = (radius >= 1) & (radius <= box * apix / resolution_A)
    w = whitening(set_power(ps, reader), shell_index(box).reshape(-1), box).reshape(box, box) * band
    sectors = sector_index(box)
    out = {"cc_low": [], "sector": []}
    for lo in range(0, len(ps), batch):
        rows = np.arange(lo, min(lo + batch, len(ps)))
        images = torch.from_numpy(ps.read_images(reader, rows))
        ctf = ctf_images(ps.ctf, rows, box, ps.pixel_size[rows])
        projection = projector.project(ps.quat[rows], torch.as_tensor(ps.shift_A[rows] / apix, dtype=torch.float32))
        for key, value in zip(out, full_grid_features(images, ctf, projection, w, sectors)):
            out[key].append(value.double().numpy())
    reader.close()
    return {k: np.concatenate(v) for k, v in out.items()}, (time.process_time() - t0) / max(len(ps), 1)


def ranks(score: np.ndarray) -> np.ndarray:
    """(N,) percentile ranks in (0, 1] (ties averaged)."""
    return rankdata(score) / len(score)


def statistics(ps: ParticleSet, features: dict, anisotropy: np.ndarray) -> dict[str, np.ndarray]:
    """Every compared statistic (N,), high = junk: the product's (trace, refine), the refinement's own score, the
    trace+anisotropy candidate of relion_job.py, and the projection-based ones."""
    unc = read_uncertainty(ps)
    trace = uncertainty_score(unc, "trace")
    cc, sector = features["cc_low"], features["sector"]
    return {"trace (default)": trace, "refine": uncertainty_score(unc, "refine"),
            "refine score": -np.asarray(ps.column(REFINE_STAR["score"]), dtype=np.float64),
            "trace+anisotropy": (ranks(trace) + 0.5 * ranks(anisotropy)) / 1.5,
            "cc_low": cc, "sector": sector,
            "cc_low+trace": ranks(cc) + ranks(trace),
            "max(cc_low, anisotropy)": np.maximum(ranks(cc), ranks(anisotropy)),
            "max(cc_low, sector)": uncertainty_score({"cc_low": cc, "sector": sector}, "mismatch")}


def run_report(run: Path, drop: float, resolution_A: float) -> dict:
    """One finished relion_job.py output: for the train job's validation split and the predict job's new
    particles, every statistic's ``evaluate`` row, and the new statistics' seconds per particle."""
    from cryoforum_plugin.formats.mrc import read_map

    proj = run / "project"
    set_dir = next(run.glob("set_*/truth.star")).parent
    truth = read_star(set_dir / "truth.star")
    volume, map_apix = read_map(proj / "consensus.mrc")
    anisotropy = background_anisotropy(set_dir / "parts.mrcs")
    out = {"run": str(run), "set": str(set_dir)}
    for part, job in (("validation", TRAIN_JOB), ("new", PREDICT_JOB)):
        ps = read_star(proj / job / "refined.star")
        t = ps.image_index  # one stack: a particle's index in it is its row in truth.star
        rows = np.arange(len(ps))
        if part == "validation":
            rows = np.nonzero(np.isin(ps.uid, ModelDir(proj / job / "model").split_uids("val")))[0]
        features, seconds = projection_features(ps, volume, map_apix, resolution_A)
        junk = truth.junk[t][rows]
        err = np.degrees(geodesic_errors(ps.quat[rows], truth.quat[t][rows]))
        stats = statistics(ps, features, anisotropy[t])
        out[part] = {"job": job, "particles": int(len(rows)), "junk": int((junk > 0).sum()),
                     "seconds_per_particle": seconds,
                     "statistics": {name: evaluate(score[rows], junk, err, drop) for name, score in stats.items()}}
    return out


def print_table(name: str, part: dict) -> None:
    """One run's part: statistic, AUROC, junk out, good kept, junk removed per kind."""
    rows = part["statistics"]
    kinds = [k for k in next(iter(rows.values())) if k.startswith("removed_")]
    print(f"\n{name}: {part['job']}, {part['particles']} particles ({part['junk']} junk), new statistics "
          f"{1000 * part['seconds_per_particle']:.2f} CPU ms/particle")
    print(f"{'statistic':<26}{'AUROC':>6}{'junk out':>9}{'good kept':>10}  " + "  ".join(k[8:] for k in kinds))
    for stat, r in rows.items():
        print(f"{stat:<26}{r['auroc_junk']:6.3f}{r['junk_removed']:9.1%}{r['good_kept']:10.1%}  "
              + "  ".join(f"{r[k]:>{len(k) - 8}}" for k in kinds))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, action="append", required=True,
                    help="a finished relion_job.py --out directory (repeat for several seeds)")
    ap.add_argument("--drop", type=float, default=0.25, help="fraction dropped (the jobs' default)")
    ap.add_argument("--resolution", type=float, default=RESOLUTION_A, help="low-resolution band limit (Å)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    results = {"drop": args.drop, "resolution_A": args.resolution, "runs": []}
    for run in args.run:
        res = run_report(run, args.drop, args.resolution)
        results["runs"].append(res)
        for part in ("validation", "new"):
            print_table(f"{run.name} {part}", res[part])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
