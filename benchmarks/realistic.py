#!/usr/bin/env python3
"""Realistic-set benchmark and learning curve: particles made by real `relion_project` at uniformly random
orientations with per-particle defocus, astigmatism and shifts (SNR 0.1, 64 px), trained on one part and tested
on 1000 particles never seen in training.

  python benchmarks/realistic.py --train-sizes 2000,10000 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin import geometry  # noqa: E402
from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.evaluation import errors  # noqa: E402
from cryoforum_plugin.images import write_mrc  # noqa: E402
from cryoforum_plugin.particles import read_star  # noqa: E402
from cryoforum_plugin.prediction import predict  # noqa: E402
from cryoforum_plugin.simulation import resized_map  # noqa: E402
from cryoforum_plugin.training import Trainer, TrainConfig  # noqa: E402

OPTIONS = {"paper defaults": {}, "augment + symmetric A": {"augment_psi": True, "qcqp_param": "symmetric"}}


def make_relion_set(d: Path, n: int, box: int, snr: float, seed: int) -> Path:
    """relion_project particles: random poses, shifts up to 3 px, defocus 1-2.5 µm with astigmatism, white noise."""
    if (d / "parts.star").exists():
        return d / "parts.star"
    d.mkdir(parents=True, exist_ok=True)
    vol, apix = resized_map(DEFAULT_MAP, box)
    write_mrc(d / "map.mrc", vol.numpy(), apix)
    rng = np.random.default_rng(seed)
    q = geometry.random_quats(n, rng)
    ang = geometry.quat_to_relion_euler(q)
    du = rng.uniform(10000, 25000, n)
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@x.mrcs" for i in range(n)], "rlnAngleRot": ang[:, 0],
                          "rlnAngleTilt": ang[:, 1], "rlnAnglePsi": ang[:, 2],
                          "rlnOriginXAngst": rng.uniform(-3, 3, n) * apix, "rlnOriginYAngst": rng.uniform(-3, 3, n) * apix,
                          "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, 1000, n),
                          "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnOpticsGroup": 1})
    starfile.write({"optics": optics, "particles": parts}, d / "poses.star")
    subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "poses.star", "--o", "clean", "--ctf"], cwd=d,
                   check=True, capture_output=True)
    signal = float(mrcfile.mmap(d / "clean.mrcs").data[:500].var(axis=(1, 2)).mean())
    subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "poses.star", "--o", "parts", "--ctf", "--add_noise",
                    "--white_noise", str(np.sqrt(signal / snr))], cwd=d, check=True, capture_output=True)
    return d / "parts.star"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sizes", default="2000,10000")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "realistic")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.train_sizes.split(",")]
    n_test, n_val = 1000, 500
    star = make_relion_set(args.work / f"set_b{args.box}_snr{args.snr:g}", max(sizes) + n_test + n_val, args.box,
                           args.snr, seed=3)
    ps = read_star(star)
    n = len(ps)
    test_fraction, val_fraction = n_test / n, n_val / n
    results = {"set": str(star), "particles": n, "box": args.box, "snr": args.snr, "epochs": args.epochs,
               "width": args.width, "rows": []}
    print(f"relion_project set: {n} particles, {args.box} px, SNR {args.snr}; test {n_test} held out; "
          f"width {args.width}, {args.epochs} epochs, batch 64")
    print(f"{'options':<24}{'train n':>9}{'train med':>11}{'test med rad':>14}{'test med deg':>14}{'test mean deg':>15}{'s':>7}")
    for name in args.options.split(","):
        for size in sizes:
            cfg = TrainConfig(box=args.box, width=args.width, epochs=args.epochs, batch=64, lr=3e-3,
                              val_fraction=val_fraction, test_fraction=test_fraction, max_particles=size, seed=42,
                              **OPTIONS[name])
            model = args.work / "models" / f"{name.replace(' ', '_').replace('+', '')}_{size}"
            t0 = time.time()
            trainer = Trainer(ps, model, cfg, torch.device("cpu"), progress=False)
            trainer.train()
            seconds = time.time() - t0
            pred = predict(ps, model, progress=False)
            err = errors(pred.quat, ps.quat)
            test, train = err[trainer.split["test"]], err[trainer.split["train"]]
            row = {"options": name, "train_particles": len(trainer.split["train"]), "train_median_rad": float(np.median(train)),
                   "test_median_rad": float(np.median(test)), "test_median_deg": float(np.degrees(np.median(test))),
                   "test_mean_deg": float(np.degrees(np.mean(test))), "train_seconds": round(seconds, 1),
                   "epochs_log": trainer.log}
            results["rows"].append(row)
            print(f"{name:<24}{row['train_particles']:>9}{row['train_median_rad']:>11.3f}{row['test_median_rad']:>14.3f}"
                  f"{row['test_median_deg']:>14.1f}{row['test_mean_deg']:>15.1f}{seconds:>7.0f}", flush=True)
            (args.work / "realistic.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
