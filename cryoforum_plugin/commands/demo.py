"""``cryoforum demo --out DIR``: simulate a particle set from the embedded map, run the job a user runs on it
(``pipeline_job.pipeline`` with the product's defaults, the outputs of ``cryoforum run`` and the RELION External job),
then report against the true poses on the model's held-out test particles."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

from cryoforum_plugin import __version__
from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin.pipeline import job as pipeline_job
from cryoforum_plugin.pipeline import evaluation
from cryoforum_plugin import manifest
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.runtime import resolve_device, set_threads

# The data each demo size (the demo's --preset: tiny / cpu / gpu) simulates. ``options`` are the only job options
# the demo changes from the defaults a RELION / cryoSPARC / ``cryoforum run`` user gets (the training presets,
# train.config.PRESETS, then fill the rest as in any job); only the one-minute smoke test changes any.
DEMO_DATA = {
    "tiny": dict(n=600, box=32, snr=1.0, max_shift=4.0, junk=0.1,
                 options=dict(box=32, pretrain_steps=200, time_budget=0.0, epochs=3, global_search="all")),
    "cpu": dict(n=4000, box=64, snr=0.1, max_shift=4.0, junk=0.1, options={}),
    "gpu": dict(n=20000, box=128, snr=0.1, max_shift=8.0, junk=0.1, options={}),
}


def add_args(parser):
    manifest.add_arguments(parser, "demo")


def main(args):
    from cryoforum_plugin.formats.files import read_particles
    from cryoforum_plugin.physics.resample import resized_map
    from cryoforum_plugin.sim.dataset import simulate

    set_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = DEMO_DATA[args.preset]
    opts = pipeline_options.options(**d["options"], device=str(device), threads=args.threads)
    import torch

    log = {"cryoforum": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads(),
           "preset": args.preset, "settings": {k: v for k, v in d.items() if k != "options"},
           "options_changed_from_the_defaults": d["options"], "steps": {}}
    changed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d["options"].items()) or "none"
    print(f"cryo-forum demo '{args.preset}' on {device}: {d['n']} particles of the embedded asymmetric map, "
          f"{d['box']} px, SNR {d['snr']}, random orientations, CTF, shifts up to {d['max_shift']} Å, {d['junk']:.0%} "
          f"junk; then the job a RELION / cryoSPARC user runs (cryoforum run --train particles.star), options changed "
          f"from its defaults: {changed}", flush=True)

    def step(name, fn):
        t0 = time.time()
        result = fn()
        log["steps"][name] = round(time.time() - t0, 1)
        write_text(out / "run.log", json.dumps(log, indent=2, default=float))
        print(f"[{name}] done in {log['steps'][name]:.0f} s", flush=True)
        return result

    sim = out / "simulated"
    step("simulate", lambda: simulate(DEFAULT_MAP, sim, n=d["n"], box=d["box"], snr=d["snr"], max_shift=d["max_shift"],
                                      junk_fraction=d["junk"], seed=1, device=device))
    particles = sim / "particles.star"
    ps = read_particles(particles)
    job = out / "job"
    model = job / "model"

    def run_job():
        result = pipeline_job.pipeline(opts, train_set=ps, predict_set=ps, model_dir=model)
        pipeline_job.write_outputs(result, job, particles, opts, fmt="star")
        return result

    result = step("job", run_job)
    vol, apix = resized_map(DEFAULT_MAP, d["box"])
    from cryoforum_plugin.formats.mrc import write_mrc

    write_mrc(out / "true_map.mrc", vol.numpy(), apix)
    summary = step("report", lambda: evaluation.report(read_particles(job / "predicted.star"),
                                                       read_particles(sim / "truth.star"), out / "report",
                                                       refined=read_particles(job / "refined.star"),
                                                       true_map=out / "true_map.mrc", model_dir=model, split="test",
                                                       statistic=opts.statistic, drop=opts.drop, device=device))
    log["summary"] = summary["headline"]
    log["reconstructions"] = summary.get("reconstructions")
    log["selection"] = result.selection.summary
    write_text(out / "run.log", json.dumps(log, indent=2, default=float))
    chance = summary["errors_good"]["chance_median_rad"]
    print("\n=== cryo-forum demo summary (held-out test particles) ===")
    print(f"{'particles (test split)':<44}{summary['headline']['particles']}")
    print(f"{'median error, good particles (network)':<44}{summary['errors_good']['median_deg']:.1f}° "
          f"({summary['errors_good']['median_rad']:.3f} rad; chance {chance:.2f} rad)")
    print(f"{'median error after refinement':<44}{summary['errors_refined_good']['median_deg']:.1f}° "
          f"(shifts: {summary['shift_error_refined_px']:.2f} px)")
    print(f"{'median error after dropping ' + format(opts.drop, '.0%') + ' (' + summary['statistic'] + ')':<44}"
          f"{summary['errors_kept_good']['median_deg']:.1f}°")
    print(f"{'junk dropped at ' + format(opts.drop, '.0%'):<44}{summary['junk']['junk_dropped_fraction']:.0%}")
    for name, r in (summary.get("reconstructions") or {}).items():
        print(f"{'resolution, ' + name:<44}{r.get('fsc_vs_truth_0.5_A', float('nan')):.1f} Å (FSC 0.5 vs true map), "
              f"{r['half_map_fsc_0.143_A']:.1f} Å (half-maps, 0.143)")
    for name, s in log["steps"].items():
        print(f"{'time, ' + name:<44}{s:.0f} s")
    print(f"job outputs: {job}   report: {out / 'report' / 'report.html'}   log: {out / 'run.log'}")
