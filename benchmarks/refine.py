#!/usr/bin/env python3
"""Projection-matching refinement (cryoforum_plugin.refinement) on held-out relion_project particles.

One relion_project set (random poses, shifts up to 3 px, per-particle defocus and astigmatism, white noise at the
given SNR): the first ``--n`` particles are refined, the reference is reconstructed (gold-standard half-maps, our
reconstruction.reconstruct at the true poses) from ``--n-ref`` OTHER particles of the same set. Starts:

- ``5``, ``10``, ``20``, ``40``: the true pose rotated by exactly that many degrees about a random axis, start
  shift 0 (the true shifts are unknown), local search with that radius hint (``global_search="none"``);
- ``random``: uniformly random starts, global search for all;
- ``network``: the poses predicted by the model in ``--model`` (prediction.predict), ``global_search="auto"``
  with the network's uncertainty as the radius hint when the model gives one.

Reported per start: median / p90 error (degrees, symmetry-aware), fraction within 3° and 5°, median shift error
(pixels), particles per second of refine() (wall clock of the whole call: reading, noise estimate, search), CPU
milliseconds per particle (all threads; on a shared machine the better measure of work), confidence of the good
(< 5°) and the bad particles. ``--relion`` adds relion_refine from the same starts (local searches, sigma
from the start) and a RELION auto-refine from random starts, timed with the same threads.

  python benchmarks/refine.py --n 500 --starts 5,10,20,40,random --threads 2
  python benchmarks/refine.py --n 200 --starts 20 --relion --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import starfile
import torch
from scipy.spatial.transform import Rotation

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry  # noqa: E402
from cryoforum_plugin.formats.mrc import write_mrc  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.physics.reconstruct import reconstruct  # noqa: E402
from cryoforum_plugin.refine.driver import refine  # noqa: E402
from realistic import make_relion_set  # noqa: E402  (the same relion_project set as benchmarks/realistic.py)


def rotate_by(q: np.ndarray, deg: float, rng: np.random.Generator) -> np.ndarray:
    """Each pose rotated by exactly ``deg`` degrees about a random axis (image frame: dq ⊗ q)."""
    axis = rng.normal(size=(len(q), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    dq = Rotation.from_rotvec(axis * np.radians(deg)).as_quat(scalar_first=True)
    return rotations.normalize(rotations.quat_mul(dq, q))


def summary(name: str, quat, shift_A, truth, apix: float, seconds: float, confidence=None, sym="C1") -> dict:
    err = np.degrees(symmetry.symmetric_geodesic(np.asarray(quat), truth.quat, symmetry.group_quats(sym)))
    serr = np.linalg.norm(np.asarray(shift_A) - truth.shift_A, axis=1) / apix
    row = {"start": name, "n": len(err), "median_deg": float(np.median(err)),
           "p90_deg": float(np.percentile(err, 90)), "within_3deg": float(np.mean(err < 3)),
           "within_5deg": float(np.mean(err < 5)), "shift_median_px": float(np.median(serr)),
           "seconds": round(seconds, 2), "particles_per_s": len(err) / max(seconds, 1e-9)}
    if confidence is not None:
        good = err < 5
        row["confidence_good"] = float(np.median(confidence[good])) if good.any() else float("nan")
        row["confidence_bad"] = float(np.median(confidence[~good])) if (~good).any() else float("nan")
    return row


def print_row(row: dict) -> None:
    print(f"{row['method']:<10}{row['start']:>9}{row['n']:>6}{row['median_deg']:>9.2f}{row['p90_deg']:>9.2f}"
          f"{row['within_3deg']:>8.3f}{row['within_5deg']:>8.3f}{row['shift_median_px']:>10.3f}"
          f"{row['particles_per_s']:>10.1f}{row.get('confidence_good', float('nan')):>9.3f}"
          f"{row.get('confidence_bad', float('nan')):>9.3f}"
          f"{1e3 * row.get('cpu_seconds_per_particle', float('nan')):>9.1f}", flush=True)


# ------------------------------------------------------------------------------------------ RELION side-by-side


def _relion_star(path: Path, ps, quat, shift_A, half):
    """A RELION 3.1 particle STAR of the test particles with the given start poses and origins."""
    ang = rotations.quat_to_relion_euler(quat)
    src = starfile.read(ps.path, always_dict=True)
    parts = src["particles"].iloc[: len(quat)].copy()
    parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"] = ang[:, 0], ang[:, 1], ang[:, 2]
    parts["rlnOriginXAngst"], parts["rlnOriginYAngst"] = shift_A[:, 0], shift_A[:, 1]
    parts["rlnRandomSubset"] = half
    parts["rlnImageName"] = [f"{int(i) + 1:06d}@{p}" for p, i in zip(ps.image_path[: len(quat)],
                                                                       ps.image_index[: len(quat)])]
    starfile.write({"optics": src["optics"], "particles": parts}, path)


def run_relion(work: Path, ps, truth, start_quat, start_deg, ref_path: Path, apix: float, threads: int,
               auto: bool) -> dict:
    """relion_refine against the same reference: from the given starts one expectation step of local searches
    (±3 sigma with sigma = start/3, HEALPix order 4 = 3.75° (5 = 1.9° for starts ≤ 5°) with oversampling 1,
    offsets ±5 px in 1 px steps, resolution up to Nyquist), or a full 3D auto-refine from random starts (HEALPix
    order 2 = 15° to local searches from order 4, gold-standard halves, the reference low-passed to 30 Å).
    Wall clock of the relion_refine process; the result is its final data.star."""
    d = work / ("relion_auto" if auto else f"relion_local_{start_deg:g}")
    if d.exists():
        shutil.rmtree(d)
    (d / "out").mkdir(parents=True)
    half = np.arange(len(start_quat)) % 2 + 1
    _relion_star(d / "start.star", ps, start_quat, np.zeros((len(start_quat), 2)), half)
    args = ["relion_refine", "--i", "start.star", "--o", "out/run", "--ref", str(ref_path),
            "--particle_diameter", f"{0.8 * ps.box[0] * apix:.0f}", "--ctf", "--sym", "C1", "--zero_mask",
            "--flatten_solvent", "--oversampling", "1", "--pad", "2", "--offset_range", "5", "--offset_step", "1",
            "--j", str(threads), "--dont_combine_weights_via_disc", "--pool", "30", "--firstiter_cc"]
    if auto:  # gold-standard halves need MPI: a leader and one worker per thread
        args = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(threads + 1), "relion_refine_mpi"] + args[1:]
        args[args.index("--j") + 1] = "1"
        args += ["--auto_refine", "--split_random_halves", "--healpix_order", "2", "--auto_local_healpix_order", "4",
                 "--low_resol_join_halves", "40", "--ini_high", "30", "--norm", "--scale"]
    else:
        args += ["--iter", "1", "--K", "1", "--healpix_order", "5" if start_deg <= 5 else "4",
                 "--sigma_ang", f"{max(start_deg / 3.0, 1.0):g}", "--skip_maximize", "--ini_high", f"{2 * apix:.2f}"]
    t0 = time.time()
    proc = subprocess.run(args, cwd=d, capture_output=True, text=True)
    seconds = time.time() - t0
    final = d / "out" / "run_data.star"
    stars = [final] if final.exists() else sorted((d / "out").glob("run_it*_data.star"))
    if proc.returncode != 0 or not stars:
        return {"start": "random" if auto else f"{start_deg:g}",
                "error": (proc.stdout[-1500:] + proc.stderr[-1500:])}
    out = starfile.read(stars[-1], always_dict=True)["particles"]
    names = out["rlnImageName"].astype(str).str.split("@").str[0].astype(int).to_numpy() - 1
    order = np.argsort(names)
    q = rotations.relion_euler_to_quat(out["rlnAngleRot"].to_numpy()[order], out["rlnAngleTilt"].to_numpy()[order],
                                      out["rlnAnglePsi"].to_numpy()[order])
    s = np.stack([out["rlnOriginXAngst"].to_numpy()[order], out["rlnOriginYAngst"].to_numpy()[order]], 1)
    row = summary("random" if auto else f"{start_deg:g}", q, s, truth, apix, seconds)
    row["command"] = " ".join(args)
    return row


# ------------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="test particles")
    ap.add_argument("--n-ref", type=int, default=2000, help="other particles reconstructed into the reference")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--starts", default="5,10,20,40,random")
    ap.add_argument("--model", type=Path, default=None, help="model directory for the 'network' start")
    ap.add_argument("--single-map", action="store_true", help="one full map instead of gold-standard half-maps")
    ap.add_argument("--max-shift-A", type=float, default=None)
    ap.add_argument("--resolution-A", type=float, default=None)
    ap.add_argument("--relion", action="store_true", help="also run relion_refine from the same starts (timed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "refine")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    torch.set_num_threads(args.threads)
    star = make_relion_set(args.work / f"set_b{args.box}_snr{args.snr:g}_n{args.n + args.n_ref}",
                           args.n + args.n_ref, args.box, args.snr, seed=3)
    ps_all = read_star(star)
    apix = float(ps_all.pixel_size[0])
    test = ps_all.subset(np.arange(args.n))
    ref_set = ps_all.subset(np.arange(args.n, args.n + args.n_ref))
    t0 = time.time()
    maps = reconstruct(ref_set, halves=True, progress=False)
    t_rec = time.time() - t0
    reference = maps["full"] if args.single_map else {"half1": maps["half1"], "half2": maps["half2"]}
    ref_path = args.work / f"reference_b{args.box}_snr{args.snr:g}.mrc"
    write_mrc(ref_path, maps["full"], apix)
    results = {"set": str(star), "n": args.n, "n_ref": args.n_ref, "box": args.box, "snr": args.snr,
               "pixel_size": apix, "threads": args.threads, "device": args.device,
               "reference": "full map" if args.single_map else "half-maps", "reconstruct_seconds": round(t_rec, 1),
               "rows": []}
    print(f"{args.n} held-out relion_project particles ({args.box} px, {apix:.3f} Å/px, SNR {args.snr}); reference "
          f"from {args.n_ref} other particles ({results['reference']}); {args.threads} threads, {args.device}")
    print(f"{'method':<10}{'start':>9}{'n':>6}{'median°':>9}{'p90°':>9}{'<3°':>8}{'<5°':>8}{'shift px':>10}"
          f"{'part/s':>10}{'conf ok':>9}{'conf bad':>9}{'cpu ms':>9}")
    rng = np.random.default_rng(args.seed)
    truth = test
    for start in args.starts.split(","):
        kw = {}
        if start == "random":
            q0, mode, hint = rotations.random_quats(args.n, rng), "all", None
        elif start == "network":
            if args.model is None:
                print("network start skipped: pass --model DIR")
                continue
            from cryoforum_plugin.infer.predict import predict

            pred = predict(test, args.model, progress=False)
            q0, mode = pred.quat, "auto"
            hint = None
            if pred.evals is not None:  # Bingham dispersion -> a rough angular spread (degrees)
                disp = np.abs(np.asarray(pred.dispersion["max"], float))
                hint = np.degrees(2.0 / np.sqrt(np.maximum(disp, 1e-6)))
                hint = np.clip(hint * 2, 5, 60)
            results.setdefault("network", summary("network", q0, np.zeros((args.n, 2)), truth, apix,
                                                  pred.seconds))
        else:
            deg = float(start)
            q0, mode, hint = rotate_by(test.quat, deg, rng), "none", np.full(args.n, deg)
        start_set = dataclasses.replace(test, quat=q0, shift_A=np.zeros((args.n, 2)))
        cpu0 = time.process_time()
        res = refine(start_set, reference, reference_pixel_size=apix, global_search=mode, start_error_deg=hint,
                     max_shift_A=args.max_shift_A, resolution_A=args.resolution_A, device=args.device,
                     progress=False, **kw)
        row = summary(start, res.quat, res.shift_A, truth, apix, res.seconds, res.confidence)
        row["method"] = "cryoforum"
        row["cpu_seconds_per_particle"] = (time.process_time() - cpu0) / args.n
        row["global_searched"] = int(res.global_searched.sum())
        results["rows"].append(row)
        print_row(row)
        if args.relion and shutil.which("relion_refine") and start not in ("network",):
            r = run_relion(args.work, test, truth, q0, 0.0 if start == "random" else float(start), ref_path, apix,
                           args.threads, auto=start == "random")
            r["method"] = "relion"
            results["rows"].append(r)
            if "error" in r:
                print(f"relion_refine failed: {r['error'][-600:]}")
            else:
                print_row(r)
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "refine.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.work / 'refine.json'}")


if __name__ == "__main__":
    main()
