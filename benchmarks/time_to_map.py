#!/usr/bin/env python3
"""Time to a map: RELION 3.1 auto-refine against cryo-forum's whole job, the same particles, the same 20 Å
starting reference, the same cores (issue 19, section 4).

Data: one ``relion_project`` set (``realistic.make_relion_set``: random poses, shifts up to 3 px, defocus 1-2.5 µm
with astigmatism, white noise at --snr, --box px) of n = n_train + n_new + n_second particles, cut by row into a
training set with consensus poses (TRAIN.star, the true poses), a first batch (FIRST.star) and a second batch
(SECOND.star) of new particles; the two batches carry no angles and no origins. Truth: the set's STAR. Reference:
``relion_image_handler --i map.mrc --o ref20.mrc --lowpass 20`` (the true map low-passed by RELION's own tool).
Gold-standard auto-refine needs MPI (RELION: "Cannot split data into random halves without using MPI"), so RELION
runs as a leader and two workers with --j max(1, threads // 2) each (2 cores: ``-n 3 --j 1``). Command lines (run
in OUT/relion_first, OUT/relion_second; --relion-args replace or add options):

  mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi --i FIRST.star --o run --ref ref20.mrc
      --auto_refine --split_random_halves --ini_high 20 --particle_diameter D --ctf --healpix_order 2
      --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym C1 --pad 2 --flatten_solvent --zero_mask
      --oversampling 1 --norm --scale --low_resol_join_halves 40 --firstiter_cc --dont_combine_weights_via_disc
      --pool 3 --j 1 --random_seed SEED
  cryoforum run --train TRAIN.star --predict FIRST.star --reference ref20.mrc --out OUT/cf_first --threads T
  cryoforum run --model OUT/cf_first/model --predict SECOND.star --reference ref20.mrc --out OUT/cf_second --threads T
  cryoforum refine --particles FIRST.star --reference ref20.mrc --global-search all --out OUT/cf_refine --threads T
  cryoforum reconstruct DIR/refined.star --out DIR/all_map.mrc --halves     (OMP_NUM_THREADS=T)

D = 1.1 x the particle's extent (voxels above 5 % of the map's maximum), at most the box less 10 px. Measured per
row: wall clock of the whole process (time to a map: RELION's process; the cryo-forum job, whose confident_map.mrc
is its map; refine + reconstruct for the refinement-only path), median / p90 angular error of the final poses
against the truth (C1, rows matched by rlnImageName) and median shift error (px), and the map of ALL particles
(RELION's run_class001.mrc; for cryo-forum ``reconstruct`` of refined.star, like for like): half-map FSC at 0.143
(unmasked, like RELION's _rlnCurrentResolution, also recorded) and FSC against the true map at 0.5 and 0.143.
Derived (extrapolated linearly in the particle count): the count at which the whole job overtakes RELION (training
as a fixed cost, the rest of the job per particle, against RELION's time per particle), and the one at which it
overtakes the refinement-only path. JSON: OUT/time_to_map.json, rewritten after every phase.

  python benchmarks/time_to_map.py --out benchmarks/out/time_to_map --threads 2
  python benchmarks/time_to_map.py --n-train 200 --n-new 100 --n-second 100 --threads 1 \
      --cryoforum-args "--time-budget 1 --epochs 1" --relion-args "--healpix_order 1 --auto_local_healpix_order 2"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import starfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.physics.fsc import fsc_curve, resolution  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from realistic import make_relion_set  # noqa: E402  (the same relion_project set as benchmarks/realistic.py)

CRYOFORUM = str(ROOT / ".venv" / "bin" / "cryoforum") if (ROOT / ".venv/bin/cryoforum").exists() else "cryoforum"
RELION_OPTIONS = ("--auto_refine --split_random_halves --ini_high 20 --ctf --healpix_order 2 --auto_local_healpix_order 4 "
                  "--offset_range 5 --offset_step 2 --sym C1 --pad 2 --flatten_solvent --zero_mask --oversampling 1 "
                  "--norm --scale --low_resol_join_halves 40 --firstiter_cc --dont_combine_weights_via_disc --pool 3")


def merge_args(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with each ``--flag [values]`` of ``extra`` replacing the same flag's values, or appended
    (RELION reads the first occurrence of a flag, so appending would not override)."""
    def groups(tokens):
        out, key = {}, None
        for t in tokens:
            if t.startswith("--"):
                key = t
                out[key] = []
            else:
                out[key].append(t)
        return out

    merged = {**groups(base), **groups(extra)}
    return [t for k, v in merged.items() for t in [k, *v]]


def particle_diameter(map_path: Path) -> float:
    """RELION's --particle_diameter (Å): 1.1 x the extent of the voxels above 5 % of the map's maximum, at most the
    box less 10 px (room for RELION's 5 px soft mask edge)."""
    with mrcfile.open(map_path) as m:
        vol, apix = np.asarray(m.data, np.float32), float(m.voxel_size.x)
    box = vol.shape[0]
    r = np.sqrt(((np.indices(vol.shape) - box // 2) ** 2).sum(0))
    extent = 2 * r[vol > 0.05 * vol.max()].max() * apix
    return float(min(1.1 * extent, (box - 10) * apix))


def write_part(parts_star: Path, rows: np.ndarray, path: Path, poses: bool) -> Path:
    """The given rows of the set's STAR with absolute image names; without angles and origins unless ``poses``."""
    tables = starfile.read(parts_star, always_dict=True)
    parts = tables["particles"].iloc[rows].copy()
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{(parts_star.parent / n.split('@')[1]).resolve()}"
                             for n in parts["rlnImageName"]]
    if not poses:
        parts = parts.drop(columns=[c for c in parts if c.startswith(("rlnAngle", "rlnOrigin"))])
    starfile.write({"optics": tables["optics"], "particles": parts}, path)
    return path


def timed(cmd: list[str], cwd: Path, log: Path, threads: int) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd`` (stdout and stderr to ``log``), OMP/MKL threads pinned; wall seconds and each line's time.
    Raises on a non-zero exit with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    stamps, t0 = [], time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            stamps.append((time.time() - t0, line.rstrip()))
            f.write(f"[{stamps[-1][0]:8.1f}] {line}")
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} failed ({rc}):\n" + "\n".join(s for _, s in stamps[-20:]))
    return time.time() - t0, stamps


def pose_errors(star: Path, truth) -> dict:
    """Median / p90 angular error (degrees, C1) and median shift error (px) of ``star``'s poses against the truth,
    rows matched by image name (RELION may reorder them)."""
    ps = read_star(star)
    lookup = {(p, i): k for k, (p, i) in enumerate(zip(truth.image_path, truth.image_index))}
    rows = np.array([lookup[(p, i)] for p, i in zip(ps.image_path, ps.image_index)])
    err = np.degrees(geodesic_errors(ps.quat, truth.quat[rows]))
    shift = np.linalg.norm(ps.shift_A - truth.shift_A[rows], axis=1) / truth.pixel_size[rows]
    return {"n": len(rows), "median_deg": float(np.median(err)), "p90_deg": float(np.percentile(err, 90)),
            "shift_median_px": float(np.median(shift))}


def map_metrics(full: Path, half1: Path, half2: Path, true_map: Path) -> dict:
    """Unmasked half-map FSC at 0.143 and FSC of the full map against the true map at 0.5 and 0.143 (Å)."""
    def load(p):
        with mrcfile.open(p) as m:
            return np.asarray(m.data, np.float32), float(m.voxel_size.x)

    (f, apix), (h1, _), (h2, _), (t, _) = load(full), load(half1), load(half2), load(true_map)
    halves, vs_true = fsc_curve(h1, h2), fsc_curve(f, t)
    box = f.shape[0]
    return {"half_fsc_0143_A": resolution(halves, box, apix, 0.143), "true_fsc_05_A": resolution(vs_true, box, apix, 0.5),
            "true_fsc_0143_A": resolution(vs_true, box, apix, 0.143)}


def run_relion(star: Path, d: Path, ref: Path, diameter: float, truth, true_map: Path, args) -> dict:
    """relion_refine_mpi --auto_refine from ref20.mrc on ``star`` to convergence in ``d``; wall clock, errors, map."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    options = merge_args(shlex.split(RELION_OPTIONS) + ["--particle_diameter", f"{diameter:.0f}", "--j",
                                                        str(max(1, args.threads // 2)), "--random_seed", str(args.seed)],
                         shlex.split(args.relion_args))
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "3", "relion_refine_mpi", "--i", str(star),
           "--o", str(d / "run"), "--ref", str(ref)] + options
    seconds, _ = timed(cmd, d, d / "log.txt", max(1, args.threads // 2))
    model = starfile.read(d / "run_model.star", always_dict=True)["model_general"]
    own = float(np.asarray(model["rlnCurrentResolution"]).ravel()[0])
    return {"seconds": round(seconds, 1), "command": " ".join(cmd), "relion_resolution_A": own,
            "iterations": len(list(d.glob("run_it*_model.star"))) - 1, **pose_errors(d / "run_data.star", truth),
            **map_metrics(d / "run_class001.mrc", d / "run_half1_class001_unfil.mrc",
                          d / "run_half2_class001_unfil.mrc", true_map)}


STEPS = {"training": "train", "predicting": "predict", "refining": "refine", "kept": "select",
         "reconstructing": "reconstruct"}


def step_times(stamps: list[tuple[float, str]], total: float) -> dict:
    """Seconds of each step of a ``cryoforum run`` (startup, train, predict, refine, select, reconstruct) from the
    times its '[cryo-forum] training|predicting|refining|kept|reconstructing ...' lines appeared."""
    marks = [(0.0, "startup")] + [(t, STEPS[s.split()[1]]) for t, s in stamps
                                  if s.startswith("[cryo-forum] ") and s.split()[1] in STEPS] + [(total, "end")]
    out = {}
    for (t, name), (t_next, _) in zip(marks, marks[1:]):
        out[name] = round(out.get(name, 0.0) + t_next - t, 1)
    return out


def cryoforum_map(d: Path, truth, true_map: Path, threads: int) -> dict:
    """``cryoforum reconstruct`` of all of ``d``/refined.star (half-maps), its pose errors and map metrics."""
    seconds, _ = timed([CRYOFORUM, "reconstruct", "refined.star", "--out", "all_map.mrc", "--halves"], d,
                       d / "reconstruct_log.txt", threads)
    row = {**pose_errors(d / "refined.star", truth), "reconstruct_seconds": round(seconds, 1),
           **map_metrics(d / "all_map.mrc", d / "all_map_half1.mrc", d / "all_map_half2.mrc", true_map)}
    if (d / "confident_map.mrc").exists():
        row["confident_map"] = map_metrics(d / "confident_map.mrc", d / "confident_map_half1.mrc",
                                           d / "confident_map_half2.mrc", true_map)
        row["confident_map"]["n"] = len(read_star(d / "confident.star"))
    return row


def run_cryoforum(name: str, cmd: list[str], d: Path, truth, true_map: Path, threads: int) -> dict:
    """One cryo-forum command into ``d`` (timed, with step times), then the map of all its refined particles."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    seconds, stamps = timed(cmd + ["--out", str(d), "--threads", str(threads)], d, d / "log.txt", threads)
    row = {"seconds": round(seconds, 1), "command": " ".join(cmd), "steps": step_times(stamps, seconds)}
    if (d / "run.json").exists():
        row["run_json_seconds"] = json.loads((d / "run.json").read_text()).get("seconds")
    row.update(cryoforum_map(d, truth, true_map, threads))
    if name == "refine-only":  # no map without the reconstruction: it is part of the time to a map
        row["seconds"] = round(seconds + row["reconstruct_seconds"], 1)
    return row


def derived(res: dict, n_new: int) -> dict:
    """Linear extrapolation: the particle count at which the whole job (training fixed, the rest per particle)
    overtakes RELION auto-refine and the refinement-only path, and the amortized speed-up."""
    rows, out = res["rows"], {}
    job, relion = rows.get("cryo-forum job/first"), rows.get("RELION/first")
    if job:
        fixed = job["steps"].get("train", 0.0)
        per = (job["seconds"] - fixed) / n_new
        out.update(job_fixed_s=fixed, job_per_particle_s=per)
        for key, other in (("overtakes_relion_at_n", relion), ("overtakes_refine_only_at_n", rows.get("refine-only/first"))):
            if other:
                gain = other["seconds"] / n_new - per
                out[key] = round(fixed / gain) if gain > 0 else None  # None: never (the other is cheaper per particle)
    if rows.get("RELION/second") and rows.get("cryo-forum amortized/second"):
        out["amortized_speedup"] = rows["RELION/second"]["seconds"] / rows["cryo-forum amortized/second"]["seconds"]
    return out


def print_table(res: dict) -> None:
    """The rows so far and the derived lines."""
    print(f"\n{'program/batch':<30}{'n':>6}{'wall s':>9}{'med°':>7}{'p90°':>7}{'shift px':>9}{'½FSC Å':>8}"
          f"{'true .5':>8}{'.143':>7}{'own Å':>7}")
    for name, r in res["rows"].items():
        print(f"{name:<30}{r['n']:>6}{r['seconds']:>9.0f}{r['median_deg']:>7.2f}{r['p90_deg']:>7.2f}"
              f"{r['shift_median_px']:>9.2f}{r['half_fsc_0143_A']:>8.2f}{r['true_fsc_05_A']:>8.2f}"
              f"{r['true_fsc_0143_A']:>7.2f}{r.get('relion_resolution_A', float('nan')):>7.2f}")
        if "confident_map" in r:
            c = r["confident_map"]
            print(f"{'  its confident_map.mrc':<30}{c['n']:>6}{'':>9}{'':>7}{'':>7}{'':>9}{c['half_fsc_0143_A']:>8.2f}"
                  f"{c['true_fsc_05_A']:>8.2f}{c['true_fsc_0143_A']:>7.2f}")
    for key, value in res.get("derived", {}).items():
        print(f"  {key} (extrapolated linearly): {value if value is not None else 'never'}"
              if key.startswith("overtakes") else f"  {key}: {value:.3g}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=2000, help="training particles with consensus poses")
    ap.add_argument("--n-new", type=int, default=1000, help="first batch of new particles")
    ap.add_argument("--n-second", type=int, default=1000, help="second batch of new particles (amortized case)")
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="cores for each program")
    ap.add_argument("--seed", type=int, default=3, help="the set's seed (and RELION's --random_seed)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "time_to_map")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--skip-cryoforum", action="store_true")
    ap.add_argument("--cryoforum-args", default="", help="extra options of both `cryoforum run`s")
    ap.add_argument("--relion-args", default="", help="relion_refine options replacing or adding to the defaults")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    n = args.n_train + args.n_new + args.n_second
    star = make_relion_set(out / f"set_n{n}_b{args.box}_snr{args.snr:g}_seed{args.seed}", n, args.box, args.snr,
                           seed=args.seed)
    true_map = star.parent / "map.mrc"
    truth = read_star(star)
    cuts = np.cumsum([0, args.n_train, args.n_new, args.n_second])
    train, first, second = (write_part(star, np.arange(a, b), out / f"{name}.star", poses=name == "train")
                            for name, a, b in zip(("train", "first", "second"), cuts, cuts[1:]))
    ref = out / "ref20.mrc"
    subprocess.run(["relion_image_handler", "--i", str(true_map), "--o", str(ref), "--lowpass", "20"], check=True,
                   capture_output=True)
    diameter = particle_diameter(true_map)
    res = {"set": str(star), "n_train": args.n_train, "n_new": args.n_new, "n_second": args.n_second, "box": args.box,
           "snr": args.snr, "threads": args.threads, "particle_diameter_A": diameter, "rows": {}}
    print(f"relion_project set {star.parent.name}: train {args.n_train}, first {args.n_new}, second {args.n_second}; "
          f"reference ref20.mrc; particle diameter {diameter:.0f} Å; {args.threads} cores", flush=True)
    cf_extra = shlex.split(args.cryoforum_args)
    ref_args = ["--reference", str(ref)]
    phases = []
    if not args.skip_relion:
        phases += [("RELION/first", lambda: run_relion(first, out / "relion_first", ref, diameter, truth, true_map, args)),
                   ("RELION/second", lambda: run_relion(second, out / "relion_second", ref, diameter, truth, true_map,
                                                        args))]
    if not args.skip_cryoforum:
        jobs = [("cryo-forum job/first", "cf_first", ["run", "--train", str(train), "--predict", str(first)] + cf_extra),
                ("cryo-forum amortized/second", "cf_second", ["run", "--model", str(out / "cf_first" / "model"),
                                                              "--predict", str(second)] + cf_extra),
                ("refine-only/first", "cf_refine", ["refine", "--particles", str(first), "--global-search", "all"])]
        phases += [(name, lambda name=name, d=d, c=c: run_cryoforum(name.split("/")[0], [CRYOFORUM] + c + ref_args,
                                                                    out / d, truth, true_map, args.threads))
                   for name, d, c in jobs]
    for name, phase in phases:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            res["rows"][name] = phase()
        except Exception as exc:  # noqa: BLE001  (keep the other phases; the error goes to the JSON)
            res.setdefault("errors", {})[name] = str(exc)
            print(f"{name} failed: {exc}", flush=True)
        res["derived"] = derived(res, args.n_new)
        (out / "time_to_map.json").write_text(json.dumps(res, indent=1, default=float))
    print_table(res)
    print(f"wrote {out / 'time_to_map.json'}")


if __name__ == "__main__":
    main()
