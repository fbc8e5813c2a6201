"""``cryoforum demo --out DIR``: the whole job on the embedded map, with a summary table and a report."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__, jobs, manifest
from ..atomic import write_text
from ..data import DEFAULT_MAP
from ..devices import resolve_device, set_threads
from ..model_dir import ModelDir
from ..progress import Events

# Data size, SNR and training length per preset: chosen so that the method visibly works in the time budget.
PRESETS = {
    "tiny": dict(n=600, box=32, snr=1.0, max_shift=4.0, junk=0.1, global_search="all", statistic="refine",
                 train=dict(box=32, width=0.125, epochs=3, batch=32, lr=3e-3)),
    "cpu": dict(n=4000, box=64, snr=1.0, max_shift=4.0, junk=0.1, global_search="auto", statistic="refine",
                train=dict(box=64, width=0.25, epochs=30, batch=64, lr=3e-3)),
    "gpu": dict(n=20000, box=128, snr=0.1, max_shift=8.0, junk=0.1, global_search="auto", statistic="refine",
                train=dict(box=128, width=1.0, epochs=50, batch=256, lr=1e-3)),
}
# Options beyond the paper's defaults that make training converge in a CPU budget (measured, see RESULTS.md).
FAST_OPTIONS = dict(qcqp_param="symmetric", augment_psi=True, dropout=0.0, l2=0.0, test_fraction=0.25,
                    val_fraction=0.15)


def add_args(parser):
    manifest.add_arguments(parser, "demo")


def main(args):
    from ..particles import read_particles
    from ..simulation import simulate
    from ..train_config import TrainConfig

    set_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = PRESETS[args.preset]
    import torch

    log = {"cryoforum": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads(),
           "preset": args.preset, "settings": p, "train_options": FAST_OPTIONS, "steps": {}}
    print(f"cryo-forum demo, preset '{args.preset}' on {device}: {p['n']} particles of the embedded asymmetric map, "
          f"{p['box']} px, SNR {p['snr']}, random orientations, CTF, shifts up to {p['max_shift']} Å, "
          f"{p['junk']:.0%} junk; training {p['train']} with {FAST_OPTIONS}", flush=True)

    def step(name, fn):
        t0 = time.time()
        result = fn()
        log["steps"][name] = round(time.time() - t0, 1)
        write_text(out / "run.log", json.dumps(log, indent=2))
        print(f"[{name}] done in {log['steps'][name]:.0f} s", flush=True)
        return result

    sim = out / "simulated"
    step("simulate", lambda: simulate(DEFAULT_MAP, sim, n=p["n"], box=p["box"], snr=p["snr"], max_shift=p["max_shift"],
                                      junk_fraction=p["junk"], seed=1, device=device))
    particles = sim / "particles.star"
    ps = read_particles(particles)
    model = out / "model"
    step("train", lambda: jobs.train(ps, model, TrainConfig(**p["train"], **FAST_OPTIONS), device=device))
    predicted, _ = step("predict", lambda: jobs.predict(ps, model, device=device))
    predicted_star = out / "predicted" / "predicted.star"
    jobs.write_predictions(predicted, out / "predicted", particles, "star")
    # the consensus map a user has: the training particles reconstructed at their (consensus) poses, half-maps
    train_set = ps.subset(np.isin(ps.uid, ModelDir(model).split_uids("train")))
    opts = jobs.options(device=str(device), global_search=p["global_search"])
    reference = step("reference", lambda: jobs.training_reference(train_set, out / "reference", opts, Events()))
    refined, refinement = step("refine", lambda: jobs.refine(predicted, reference, global_search=p["global_search"],
                                                             device=device))
    refined_star = out / "refined" / "refined.star"
    jobs.write_refined(refined, refinement, out / "refined", particles, "star", extra={"reference": reference.source})

    def select():
        selection = jobs.select(refined, statistic=p["statistic"])
        jobs.write_selection(refined, selection, out / "filtered", refined_star, "star")
        print(f"kept {selection.kept} / {len(refined)} particles (quantile, {p['statistic']})")

    step("filter", select)
    from ..images import write_mrc
    from ..simulation import resized_map

    vol, apix = resized_map(DEFAULT_MAP, p["box"])
    write_mrc(out / "true_map.mrc", vol.numpy(), apix)
    summary = step("report", lambda: jobs.report(read_particles(predicted_star), read_particles(sim / "truth.star"),
                                                  out / "report", refined=read_particles(refined_star),
                                                  true_map=out / "true_map.mrc", model_dir=model, split="test",
                                                  statistic=p["statistic"], device=device))
    log["summary"] = summary["headline"]
    log["reconstructions"] = summary.get("reconstructions")
    write_text(out / "run.log", json.dumps(log, indent=2, default=float))
    chance = summary["errors_good"]["chance_median_rad"]
    print("\n=== cryo-forum demo summary (held-out test particles) ===")
    print(f"{'particles (test split)':<44}{summary['headline']['particles']}")
    print(f"{'median error, good particles':<44}{summary['errors_good']['median_deg']:.1f}° "
          f"({summary['errors_good']['median_rad']:.3f} rad; chance {chance:.2f} rad)")
    print(f"{'median error after refinement':<44}{summary['errors_refined_good']['median_deg']:.1f}° "
          f"(shifts: {summary['shift_error_refined_px']:.2f} px)")
    print(f"{'median error after dropping 25 % (' + p['statistic'] + ')':<44}"
          f"{summary['errors_kept_good']['median_deg']:.1f}°")
    print(f"{'junk dropped at 25 %':<44}{summary['junk']['junk_dropped_fraction']:.0%}")
    for name, r in (summary.get("reconstructions") or {}).items():
        print(f"{'resolution, ' + name:<44}{r.get('fsc_vs_truth_0.5_A', float('nan')):.1f} Å (FSC 0.5 vs true map), "
              f"{r['half_map_fsc_0.143_A']:.1f} Å (half-maps, 0.143)")
    for name, s in log["steps"].items():
        print(f"{'time, ' + name:<44}{s:.0f} s")
    print(f"report: {out / 'report' / 'report.html'}   log: {out / 'run.log'}")
