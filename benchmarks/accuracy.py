#!/usr/bin/env python3
"""Accuracy benchmark (the paper's Table 1 layout): train / validation / test median error per ablation row.

Builds synthetic sets with `cryoforum simulate` (the paper's protocol: grid orientations, SNR 0.1, CTF, shifts)
from the shared maps, splits them 50/17/33, trains each ablation row and prints a table; writes JSON.

  python benchmarks/accuracy.py --scale cpu --map asym --rows default,quat,6d,single   # cpu scale
  python benchmarks/accuracy.py --scale paper --map asym                               # GPU machine
  python benchmarks/accuracy.py --scale cpu --snr-sweep                                # Supplementary Table 2
  python benchmarks/accuracy.py --scale cpu --rows default,quat --seeds 1,2,42            # seed-to-seed spread

Scales: cpu = 64 px box, width 0.25, 2 CPU threads, the epochs given (stated in the output);
paper = 128 px, full network (width 1), 50 epochs, batch 256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.infer.predict import predict  # noqa: E402
from cryoforum_plugin.sim.dataset import simulate  # noqa: E402
from cryoforum_plugin.train.config import PRESETS  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer, TrainConfig  # noqa: E402

MAPS_DIR = ROOT / "benchmarks" / "data"  # real third-party maps, each with its licence file (README.md there)
MAPS = {"asym": (MAPS_DIR / "5j0n_asym.mrc", "C1"), "betagal": (MAPS_DIR / "betagal_D2_100px_3.54A.mrc", "D2")}
ROWS = {  # the paper's ablation rows: one change from the default each
    "default": {}, "quat": {"head": "quat"}, "6d": {"head": "6d"}, "single": {"loss": "single"},
    "siamese_noreg": {"loss": "siamese_noreg"}, "no_blur": {"blur": "none"}, "gaussian": {"blur": "gaussian"},
    "max_pool": {"pooling": "max"}, "maxavg_pool": {"pooling": "maxavg"},
    "symmetric_A": {"qcqp_param": "symmetric"}, "augment": {"augment_psi": True},
    "augment_symmetric_A": {"augment_psi": True, "qcqp_param": "symmetric"},
    "no_l2": {"l2": 0.0}, "quat_no_l2": {"head": "quat", "l2": 0.0},
    # the presets (train_config.PRESETS; cpu: pre-training from the map of the training split, then 5 real epochs),
    # without a time budget: a fixed number of steps, so rows compare whatever else runs on the machine
    "preset_cpu": {**PRESETS["cpu"], "time_budget": 0}, "preset_gpu": {**PRESETS["gpu"], "time_budget": 0},
    "preset_cpu_qcqp": {**PRESETS["cpu"], "time_budget": 0, "head": "qcqp"},
}
SCALES = {"cpu": dict(box=64, width=0.25, epochs=30, batch=64, lr=3e-3),
          "paper": dict(box=128, width=1.0, epochs=50, batch=256, lr=1e-3)}


def make_set(out: Path, map_name: str, n: int, box: int, snr: float, orientations: str, seed: int) -> Path:
    path, sym = MAPS[map_name]
    d = out / f"{map_name}_{orientations}_n{n}_b{box}_snr{snr:g}"
    if not (d / "truth.star").exists():
        simulate(path, d, n=n, box=box, snr=snr, orientations=orientations, max_shift=0.0, seed=seed,
                 restrict_to_asu=False, sym=sym, progress=False)
    return d


def run_row(data: Path, model_dir: Path, sym: str, overrides: dict, scale: dict, device) -> dict:
    ps = read_star(data / "particles.star")
    cfg = TrainConfig(**{**scale, "sym": sym, "val_fraction": 0.17, "test_fraction": 0.33, **overrides})
    t0 = time.time()
    trainer = Trainer(ps, model_dir, cfg, device, progress=False)
    trainer.train()
    train_s = time.time() - t0
    pred = predict(ps, model_dir, device=device, progress=False)
    truth = read_star(data / "truth.star")
    err = geodesic_errors(pred.quat, truth.quat, sym)
    row = {"train_seconds": round(train_s, 1), "predict_particles_per_s": round(pred.particles_per_second, 1),
           "config": {k: v for k, v in vars(cfg).items()}}
    for part, rows in trainer.split.items():
        row[f"{part}_median_rad"] = float(np.median(err[rows]))
        row[f"{part}_mean_rad"] = float(np.mean(err[rows]))
        row[f"{part}_median_deg"] = float(np.degrees(np.median(err[rows])))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="cpu")
    ap.add_argument("--map", choices=list(MAPS), default="asym")
    ap.add_argument("--rows", default="default,quat,6d,single,siamese_noreg,no_blur,gaussian,max_pool,maxavg_pool")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--snr-sweep", action="store_true", help="rows = --sweep-row at SNR clean, 1.0, 0.4, 0.1")
    ap.add_argument("--sweep-row", default="default", help="the row the SNR sweep runs (e.g. preset_cpu)")
    ap.add_argument("--snrs", default="0,1,0.4,0.1", help="the SNRs of the sweep (0 = clean)")
    ap.add_argument("--orientations", choices=["grid", "random"], default="grid")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", default="42", help="comma-separated training seeds (split, initialisation, pairs); "
                    "each row runs once per seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = dict(SCALES[args.scale])
    if args.epochs:
        scale["epochs"] = args.epochs
    sym = MAPS[args.map][1]
    prefix = "" if args.sweep_row == "default" else f"{args.sweep_row}_"
    jobs = ([(f"{prefix}snr_{float(s):g}", ROWS[args.sweep_row], float(s)) for s in args.snrs.split(",")]
            if args.snr_sweep
            else [(r, ROWS[r], args.snr) for r in args.rows.split(",")])
    results = {"scale": args.scale, "scale_settings": scale, "map": args.map, "sym": sym, "n": args.n,
               "orientations": args.orientations, "device": str(device), "torch": torch.__version__, "rows": {}}
    out_json = args.json or args.work / f"accuracy_{args.scale}_{args.map}{'_snr' if args.snr_sweep else ''}.json"
    print(f"scale {args.scale}: {scale}; map {args.map} ({sym}); {args.n} particles, split 50/17/33; device {device}")
    print(f"{'row':<22}{'train':>9}{'val':>9}{'test':>9}  (median error, rad)   test deg   train s")
    seeds = [int(v) for v in args.seeds.split(",")]
    for name, overrides, snr in jobs:
        data = make_set(args.work, args.map, args.n, scale["box"], snr, args.orientations, seed=11)
        for seed in seeds:
            key = name if seed == 42 else f"{name}@seed{seed}"  # seed 42 (the default) keeps earlier names
            row = run_row(data, args.work / "models" / f"{args.scale}_{args.map}_{key.replace('@', '_')}", sym,
                          {**overrides, "seed": seed}, scale, device)
            row["snr"], row["seed"] = snr, seed
            results["rows"][key] = row
            print(f"{key:<22}{row['train_median_rad']:>9.4f}{row['val_median_rad']:>9.4f}"
                  f"{row['test_median_rad']:>9.4f}{row['test_median_deg']:>28.2f}{row['train_seconds']:>10.0f}",
                  flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=2))
        if len(seeds) > 1:
            test = [results["rows"][name if s == 42 else f"{name}@seed{s}"]["test_median_rad"] for s in seeds]
            print(f"{name + ' (seeds)':<22}test median over seeds {np.median(test):.4f} rad, range "
                  f"{min(test):.4f}-{max(test):.4f}", flush=True)
    return results


if __name__ == "__main__":
    main()
