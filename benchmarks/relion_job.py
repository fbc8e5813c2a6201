#!/usr/bin/env python3
"""What a RELION user gets with the defaults, on a set like theirs: the realistic set of issues 19 and 21, run
through real ``relion_pipeliner`` as a user runs the External job.

    python benchmarks/relion_job.py --out benchmarks/out/relion_job --threads 2          # ~35 min on 2 cores
    python benchmarks/relion_job.py --n-train 300 --n-new 200 --box 32 --out /tmp/rj \
        --other-args "--time-budget 1 --epochs 1"                                         # smoke test, ~4 min

The set (``realistic.py --realistic``'s recipe, from relion_project's projections of the embedded 70S-like map):
64 px, SNR 0.1, coloured noise with an ice background and per-micrograph levels, RELION normalisation, B-factors
50-200 Å², defocus 0.8-2.8 µm, 60 % of the particles in 3 preferred views, 20 % junk of seven kinds (noise, ice,
crystal, carbon edge, aggregate, off-centre, neighbour, empty). Cut by row into ``--n-train`` particles with
consensus poses (junk included, as in a user's consensus refinement) and ``--n-new`` new particles (no angles, no
origins). The consensus map: ``relion_reconstruct --ctf`` of the training particles with their poses.

In a RELION project: Import, then External job002 (mode train_predict, the consensus map as 3D reference, every
other option the default), then External job003 (mode predict, job002's model, the consensus map) on the new
particles. Reported against the truth, for each job (job002: its validation split, where defaults are chosen;
job003: all new particles, fresh held-out): the network's error (good particles), the refined error (median, p90,
within 5°), shift error, the refinement's global-search fraction, the error on the rarest 10 % of views against the
rest, junk removed per kind and good particles kept by the job's own confident.star / rejected.star, the same for
every selection statistic (``cryoforum filter --statistic``) at the job's drop fraction, and job003's domain check.
Then the domain check's other side: ``--n-new`` particles of β-galactosidase made by the same recipe (same box, pixel
size, SNR; the embedded β-gal map on the 70S map's grid), imported and predicted by a third External job (mode
predict, job002's model) whose predict.json must say the model does not fit (``--report-only`` runs it on a
finished project that lacks it). JSON: OUT/relion_job.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from realistic import make_relion_set, realistic_set, set_summary, truth_labels  # noqa: E402
from selection import STATISTICS, evaluate  # noqa: E402

from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.infer.select import read_uncertainty, resolve_statistic, uncertainty_score  # noqa: E402
from cryoforum_plugin.sim.junk import JUNK_KINDS  # noqa: E402
from cryoforum_plugin.train.model_dir import ModelDir  # noqa: E402


def run(args: list, cwd: Path) -> None:
    """Run a RELION binary in the project; its output on failure."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


POSE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]


def split_set(set_dir: Path, proj: Path, n_train: int, link: str = "Set", names=("train.star", "new.star")) -> None:
    """``names[0]``: the first n_train rows with their consensus poses; ``names[1]``: the rest without angles or
    origins (new particles); the set's stack is read through the project's link ``link``/."""
    star = starfile.read(set_dir / "parts.star")
    parts = star["particles"].copy()
    parts["rlnImageName"] = [name.replace("parts.mrcs", f"{link}/parts.mrcs") for name in parts["rlnImageName"]]
    if n_train:
        starfile.write({"optics": star["optics"], "particles": parts.iloc[:n_train]}, proj / names[0])
    starfile.write({"optics": star["optics"], "particles": parts.iloc[n_train:].drop(columns=POSE_COLUMNS)},
                   proj / names[1])


def import_job(proj: Path, name: str) -> str:
    """Import ``name`` (a particle STAR file in the project) through relion_pipeliner; its job directory."""
    before = set((proj / "Import").glob("job*")) if (proj / "Import").exists() else set()
    run(["relion_pipeliner", "--addJob", "Import", "--addJobOptions",
         f"do_raw == No;do_other == Yes;fn_in_other == {name};node_type == Particles STAR file (.star)"], proj)
    job = f"Import/{(set((proj / 'Import').glob('job*')) - before).pop().name}/"
    run(["relion_pipeliner", "--RunJobs", job, "--sec_wait_after", "1"], proj)
    return job


def other_protein_job(proj: Path, out: Path, args, exe: str, train_job: str) -> dict:
    """The domain check's other side inside the benchmark: ``args.n_new`` particles of β-galactosidase made by the
    same recipe (same box, pixel size, SNR, noise, views, junk; another seed), imported and predicted by a predict
    job with the train job's model, like job004. Its predict.json's domain check and the job's seconds."""
    from cryoforum_plugin.data import BETAGAL_MAP

    other_dir = out / f"other_betagal_n{args.n_new}_b{args.box}_snr{args.snr:g}_s{args.seed}"
    make_relion_set(other_dir, args.n_new, args.box, args.snr, seed=args.seed + 1000, volume=BETAGAL_MAP,
                    **realistic_set())
    if not (proj / "Other").exists():
        os.symlink(other_dir.resolve(), proj / "Other")
    split_set(other_dir, proj, 0, link="Other", names=("", "other_protein.star"))
    t0 = time.time()
    job = external(proj, exe, f"{import_job(proj, 'other_protein.star')}other_protein.star",
                   {"mode": "predict", "model": f"{train_job}model"}, args.threads, args.other_args)
    return {"job": job, "seconds": round(time.time() - t0, 1),
            "domain_check": json.loads((proj / job / "predict.json").read_text()).get("domain_check")}


def external(proj: Path, exe: str, parts: str, params: dict, threads: int, other: str) -> str:
    """Add one External job through relion_pipeliner and run it; its directory (External/jobNNN/)."""
    opts = [f"fn_exe == {exe}", f"in_part == {parts}", "in_3dref == consensus.mrc", f"nr_threads == {threads}"]
    for k, (label, value) in enumerate(params.items(), start=1):
        opts += [f"param{k}_label == {label}", f"param{k}_value == {value}"]
    if other:
        opts.append(f"other_args == {other}")
    before = set((proj / "External").glob("job*")) if (proj / "External").exists() else set()
    run(["relion_pipeliner", "--addJob", "External", "--addJobOptions", ";".join(opts)], proj)
    job = (set((proj / "External").glob("job*")) - before).pop()
    name = f"External/{job.name}/"
    run(["relion_pipeliner", "--RunJobs", name, "--sec_wait_after", "1"], proj)
    if not (job / "RELION_JOB_EXIT_SUCCESS").exists():
        raise SystemExit(f"{name} failed: {(job / 'run.err').read_text()[-3000:]}")
    return name


def background_anisotropy(stack_path: Path) -> np.ndarray:
    """(N,) log(largest / smallest) variance of 8 angular sectors of the ring outside RELION's normalisation
    radius (``relion_bg_radius``) of each image: a candidate junk statistic from the images alone (ice blobs,
    carbon, neighbours and off-centre particles put density in one side of the ring). Not in the product yet."""
    import mrcfile

    from cryoforum_plugin.physics.noise import relion_bg_radius

    stack = mrcfile.mmap(stack_path).data
    box = stack.shape[-1]
    yy, xx = np.mgrid[:box, :box] - box // 2
    ring = (np.hypot(xx, yy) > relion_bg_radius(box)) & (np.hypot(xx, yy) < box / 2)
    sector = (((np.arctan2(yy, xx) + np.pi) / (2 * np.pi) * 8).astype(int) % 8)[ring]
    out = []
    for lo in range(0, len(stack), 1000):
        bg = np.asarray(stack[lo:lo + 1000], dtype=np.float64)[:, ring]
        v = np.stack([bg[:, sector == k].var(1) for k in range(8)], 1)
        out.append(np.log(v.max(1) / v.min(1)))
    return np.concatenate(out)


def report(job: Path, truth, density_all: np.ndarray, rows: np.ndarray | None, drop: float,
           anisotropy: np.ndarray | None = None) -> dict:
    """One job's numbers against the truth (a ParticleSet with junk labels, (N,) view densities), on ``rows`` of
    its refined.star (None: all)."""
    refined, predicted = read_star(job / "refined.star"), read_star(job / "predicted.star")
    t = refined.image_index  # one stack: a particle's index in it is its row in truth.star
    assert (t == predicted.image_index).all(), "refined.star and predicted.star list the same particles in order"
    r = np.arange(len(refined)) if rows is None else rows
    junk, density = truth.junk[t][r], density_all[t][r]
    good = junk == 0
    err_net = np.degrees(geodesic_errors(predicted.quat[r], truth.quat[t][r]))
    err = np.degrees(geodesic_errors(refined.quat[r], truth.quat[t][r]))
    shift = np.linalg.norm(refined.shift_A[r] - truth.shift_A[t][r], axis=1) / truth.pixel_size[t][r]
    rare = density <= np.quantile(density_all[truth.junk == 0], 0.1)
    if (job / "refine.json").exists():  # train_predict: the refinement's summary
        refine_json = json.loads((job / "refine.json").read_text())
    else:  # predict mode runs through `cryoforum watch`: one batch here, its summary in status.json
        refine_json = json.loads((job / "status.json").read_text())["last_batch"]
    out = {"particles": int(len(r)), "good": int(good.sum()),
           "network_median_deg": float(np.median(err_net[good])), "network_mean_deg": float(np.mean(err_net[good])),
           "network_p90_deg": float(np.percentile(err_net[good], 90)),
           "network_rare10_median_deg": float(np.median(err_net[good & rare])),
           "network_other_median_deg": float(np.median(err_net[good & ~rare])),
           "refined_median_deg": float(np.median(err[good])), "refined_p90_deg": float(np.percentile(err[good], 90)),
           "refined_within_5deg": float(np.mean(err[good] < 5)),
           "refined_rare10_median_deg": float(np.median(err[good & rare])),
           "refined_other_median_deg": float(np.median(err[good & ~rare])),
           "shift_median_px": float(np.median(shift[good])),
           "global_searched_fraction": refine_json["global_searched"] / refine_json["particles"]}
    # what the job itself kept: confident.star against rejected.star (all its particles)
    if rows is None and (job / "confident.star").exists():
        keep = np.isin(refined.image_index, read_star(job / "confident.star").image_index)
        out["job_selection"] = {"good_kept": float(keep[good].mean()), "junk_removed": float((~keep[~good]).mean()),
                                **{f"removed_{JUNK_KINDS[k]}": f"{int((~keep[junk == k]).sum())}/{int((junk == k).sum())}"
                                   for k in JUNK_KINDS if k and (junk == k).any()}}
    unc = read_uncertainty(refined)
    names = STATISTICS + (("mismatch",) if resolve_statistic(unc, "auto") == "mismatch" else ())
    out["statistics"] = {s: evaluate(uncertainty_score(unc, s)[r], junk, err, drop) for s in names}
    if anisotropy is not None:  # the candidate: trace and the background's anisotropy mixed by ranks (2 : 1)
        from scipy.stats import rankdata

        trace = uncertainty_score(unc, "trace")[r]
        mixed = (rankdata(trace) + 0.5 * rankdata(anisotropy[t][r])) / 1.5
        out["statistics"]["trace+anisotropy (candidate)"] = evaluate(mixed, junk, err, drop)
    return out


def make_project(proj: Path, set_dir: Path, n_train: int) -> float:
    """A fresh RELION project: the set linked as Set/, train.star and new.star, the consensus map
    (relion_reconstruct, its seconds returned) and the two Import jobs, run."""
    if proj.exists():
        shutil.rmtree(proj)
    proj.mkdir(parents=True)
    os.symlink(set_dir.resolve(), proj / "Set")
    (proj / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n \n")
    split_set(set_dir, proj, n_train)
    t0 = time.time()
    run(["relion_reconstruct", "--i", "train.star", "--o", "consensus.mrc", "--ctf"], proj)
    seconds = round(time.time() - t0, 1)
    for name in ("train.star", "new.star"):
        import_job(proj, name)
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-new", type=int, default=1000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drop", type=float, default=0.25, help="the jobs' default drop fraction (plugin.yaml)")
    ap.add_argument("--other-args", default="", help="the External jobs' additional arguments (default: none)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "relion_job")
    ap.add_argument("--report-only", action="store_true", help="only recompute the report of a finished run in --out")
    ap.add_argument("--predict-again", action="store_true",
                    help="with --report-only: run a new predict job (today's code) on the new particles with the "
                    "finished train job's model and report it instead of job004")
    args = ap.parse_args(argv)
    exe = shutil.which("cryoforum-relion") or str(Path(sys.executable).with_name("cryoforum-relion"))
    kind = realistic_set()
    n = args.n_train + args.n_new
    set_dir = args.out / f"set_n{n}_b{args.box}_snr{args.snr:g}_s{args.seed}"
    t0 = time.time()
    make_relion_set(set_dir, n, args.box, args.snr, seed=args.seed, **kind)
    results = {"command": " ".join(sys.argv), "set": set_summary(set_dir), "build_seconds": round(time.time() - t0, 1),
               "threads": args.threads, "other_args": args.other_args}
    proj = args.out / "project"
    if args.report_only:  # the report again on a finished run's project (job003 trained, job004 predicted)
        old = json.loads((args.out / "relion_job.json").read_text())
        results.update({k: old[k] for k in ("consensus_seconds", "train_job_seconds", "predict_job_seconds")})
        train_job, predict_job = "External/job003/", "External/job004/"
    else:
        results["consensus_seconds"] = make_project(proj, set_dir, args.n_train)
    truth = read_star(set_dir / "truth.star")
    density = truth_labels(set_dir, len(truth))[1]
    aniso = background_anisotropy(set_dir / "parts.mrcs")
    if not args.report_only:
        t0 = time.time()
        train_job = external(proj, exe, "Import/job001/train.star", {"mode": "train_predict"}, args.threads,
                             args.other_args)
        results["train_job_seconds"] = round(time.time() - t0, 1)
    refined = read_star(proj / train_job / "refined.star")
    val = np.nonzero(np.isin(refined.uid, ModelDir(proj / train_job / "model").split_uids("val")))[0]
    results["train_job_validation"] = report(proj / train_job, truth, density, val, args.drop, aniso)
    results["train_job_all"] = report(proj / train_job, truth, density, None, args.drop, aniso)
    if not args.report_only or args.predict_again:
        t0 = time.time()
        predict_job = external(proj, exe, "Import/job002/new.star",
                               {"mode": "predict", "model": f"{train_job}model"}, args.threads, args.other_args)
        results["predict_job_seconds"] = round(time.time() - t0, 1)
    results["predict_job"] = predict_job
    results["predict_job_new"] = report(proj / predict_job, truth, density, None, args.drop, aniso)
    results["domain_check"] = json.loads((proj / predict_job / "predict.json").read_text()).get("domain_check")
    old_other = json.loads((args.out / "relion_job.json").read_text()).get("other_protein") if args.report_only \
        else None
    results["other_protein"] = old_other or other_protein_job(proj, args.out, args, exe, train_job)
    (args.out / "relion_job.json").write_text(json.dumps(results, indent=1, default=float))
    print_tables(results)


def print_tables(res: dict) -> None:
    """The benchmark's two tables: accuracy per job, and junk removed per statistic."""
    print(f"set: {json.dumps(res['set'])}\ntrain job {res['train_job_seconds']:.0f} s, "
          f"predict job {res['predict_job_seconds']:.0f} s; domain check: {json.dumps(res['domain_check'])[:300]}")
    for name, check in (("new particles (same set)", res["domain_check"]),
                        ("β-galactosidase (other protein)", res["other_protein"]["domain_check"])):
        print(f"domain check, {name}: fits {check['fits']}; reasons {check['reasons']}; notes {check['notes']}")
    print(f"{'part':<22}{'n':>6}{'net med':>8}{'p90':>6}{'rare10':>7}{'other':>6}{'ref med':>8}{'p90':>6}"
          f"{'<5°':>6}{'rare10':>7}{'shift':>6}{'global':>7}")
    for key in ("train_job_validation", "train_job_all", "predict_job_new"):
        r = res[key]
        print(f"{key:<22}{r['particles']:>6}{r['network_median_deg']:>8.1f}{r['network_p90_deg']:>6.1f}"
              f"{r['network_rare10_median_deg']:>7.1f}{r['network_other_median_deg']:>6.1f}"
              f"{r['refined_median_deg']:>8.2f}{r['refined_p90_deg']:>6.1f}{r['refined_within_5deg']:>6.0%}"
              f"{r['refined_rare10_median_deg']:>7.2f}{r['shift_median_px']:>6.2f}{r['global_searched_fraction']:>7.0%}")
    for key in ("train_job_validation", "predict_job_new"):
        print(f"\n{key}: junk removed / good kept at the jobs' drop fraction")
        rows = res[key]["statistics"]
        kinds = [k for k in next(iter(rows.values())) if k.startswith("removed_")]
        print(f"{'statistic':<30}{'AUROC':>6}{'junk out':>9}{'good kept':>10}  " + "  ".join(k[8:] for k in kinds))
        for stat, r in rows.items():
            print(f"{stat:<30}{r['auroc_junk']:6.3f}{r['junk_removed']:9.1%}{r['good_kept']:10.1%}  "
                  + "  ".join(f"{r[k]:>{len(k) - 8}}" for k in kinds))
        if "job_selection" in res[key]:
            print("the job's confident.star:", json.dumps(res[key]["job_selection"]))


if __name__ == "__main__":
    main()
