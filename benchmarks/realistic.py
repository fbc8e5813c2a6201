#!/usr/bin/env python3
"""Realistic-set benchmark and learning curve: particles made by real `relion_project` at uniformly random
orientations with per-particle defocus, astigmatism and shifts (SNR 0.1, 64 px), trained on one part and tested
on 1000 particles never seen in training.

  python benchmarks/realistic.py --train-sizes 2000,10000 --epochs 30

Training from the map (issue 14): each ``--row NAME:key=value,...`` is one training whose TrainConfig options are
``--base`` overridden by the row's (values: numbers, true/false, none, or MAP = the set's true map, else the
default reconstruction of the training split is used), e.g.

  python benchmarks/realistic.py --train-sizes 2000 --epochs 5 --threads 1 \
      --row 'baseline:' --row 'pretrain 1000:pretrain_steps=1000' \
      --row 'pretrain + floor:pretrain_steps=1000,beta1_floor=0.25'

prints held-out median / mean / p90 error and the time to train (pre-training included). ``--step-timing``
measures ms per optimiser step on freshly simulated batches against cached real images (same batch size).
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

from cryoforum_plugin.physics import rotations  # noqa: E402
from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.formats.mrc import write_mrc  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.physics.resample import resized_map  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer, TrainConfig  # noqa: E402

OPTIONS = {"paper defaults": {}, "augment + symmetric A": {"augment_psi": True, "qcqp_param": "symmetric"}}
BASE = "augment_psi=true,qcqp_param=symmetric"


def parse_options(text: str, set_dir: Path) -> dict:
    """'key=value,key=value' -> TrainConfig overrides (numbers, true/false, none; MAP = the set's true map)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, value = item.split("=", 1)
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low == "none":
            out[key] = None
        elif value == "MAP":
            out[key] = str(set_dir / "map.mrc")
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def held_out_report(ps, model_dir) -> dict:
    """A trained model on its own held-out test split: median / mean / p90 error (degrees) and how well its
    confidence ranks the errors (Spearman of uncertainty and error, AUROC of the uncertainty for an error > 15°)."""
    from cryoforum_plugin.infer.select import auroc, spearman
    from cryoforum_plugin.infer.predict import predict

    split = json.loads((Path(model_dir) / "split.json").read_text())
    rows = np.asarray(split["test"]["rows"] if isinstance(split["test"], dict) else split["test"])
    pred = predict(ps.subset(rows), model_dir, device="cpu", progress=False)
    err = np.degrees(geodesic_errors(pred.quat, ps.quat[rows]))
    return {"test_median_deg": float(np.median(err)), "test_mean_deg": float(np.mean(err)),
            "test_p90_deg": float(np.percentile(err, 90)), "spearman_uncertainty_error": spearman(-pred.fom, err),
            "auroc_error_over_15deg": auroc(-pred.fom, err > 15), "fraction_over_15deg": float(np.mean(err > 15))}


def step_timing(ps, cfg, steps: int = 20) -> dict:
    """ms per optimiser step (input preparation + forward + backward + update): freshly simulated batches vs
    cached real images, the same batch size, after 3 warm-up steps each."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(ps, tmp, cfg, torch.device("cpu"), progress=False)
        t.pretraining.setup()
        t.net.train()
        t.gnorms = []
        rows = t.split["train"]
        out = {}
        for name in ("cached real", "simulated"):
            times, sim = [], []
            for k in range(steps + 3):
                t0 = time.perf_counter()
                if name == "simulated":
                    x, target = t.synthetic_batch(0)
                else:
                    r = rows[(k * cfg.batch) % (len(rows) - cfg.batch):][: cfg.batch]
                    x, target = t._inputs(r, t.source.batch(r), augmented=True)
                t1 = time.perf_counter()
                t._step(x, target, 0.5)
                if k >= 3:
                    times.append(time.perf_counter() - t0)
                    sim.append(t1 - t0)
            out[name] = {"ms_per_step": 1e3 * float(np.median(times)), "ms_input": 1e3 * float(np.median(sim))}
        t.source.close()
    return out


def make_relion_set(d: Path, n: int, box: int, snr: float, seed: int, noise: str = "white") -> Path:
    """relion_project particles: random poses, shifts up to 3 px, defocus 1-2.5 µm with astigmatism, and noise of
    the given SNR: 'white' (relion_project --add_noise), or 'coloured' (relion_project's clean images plus Gaussian
    noise of the spectrum ``noise.lorentzian_with_bump()``: strong low-frequency power falling to a floor, with a
    bump near 1/12 Å⁻¹ — a colour unlike white, to test that training from the map measures and uses it)."""
    if (d / "parts.star").exists():
        return d / "parts.star"
    d.mkdir(parents=True, exist_ok=True)
    vol, apix = resized_map(DEFAULT_MAP, box)
    write_mrc(d / "map.mrc", vol.numpy(), apix)
    rng = np.random.default_rng(seed)
    q = rotations.random_quats(n, rng)
    ang = rotations.quat_to_relion_euler(q)
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
    if noise == "white":
        subprocess.run(["relion_project", "--i", "map.mrc", "--ang", "poses.star", "--o", "parts", "--ctf",
                        "--add_noise", "--white_noise", str(np.sqrt(signal / snr))], cwd=d, check=True,
                       capture_output=True)
        return d / "parts.star"
    from cryoforum_plugin.physics.noise import coloured_noise, lorentzian_with_bump, relative_spectrum

    spectrum = relative_spectrum(lorentzian_with_bump(), box, apix) * (signal / snr)  # per-pixel variance signal/snr
    gen = torch.Generator().manual_seed(seed)
    clean = torch.from_numpy(np.asarray(mrcfile.mmap(d / "clean.mrcs").data, dtype=np.float32))
    noisy = torch.cat([c + coloured_noise(len(c), box, spectrum, gen) for c in clean.split(1000)]).numpy()
    write_mrc(d / "parts.mrcs", noisy, apix)
    star = starfile.read(d / "clean.star")
    star["particles"]["rlnImageName"] = [f"{i + 1:06d}@parts.mrcs" for i in range(len(noisy))]
    starfile.write(star, d / "parts.star")
    np.save(d / "noise_spectrum.npy", spectrum)
    return d / "parts.star"


def spectrum_agreement(info: dict | None, set_dir: Path) -> dict | None:
    """How well training from the map measured the set's noise colour: the estimated spectrum (the trainer's noise
    model) against the one the coloured set was made with, both normalised to unit mean over shells 1..Nyquist;
    median and max |ratio - 1| over those shells (None for a white set or without pre-training)."""
    true_file = set_dir / "noise_spectrum.npy"
    if not info or "noise_model" not in info or not true_file.exists():
        return None
    est = np.asarray(info["noise_model"]["spectrum"], dtype=np.float64)[1:]
    true = np.load(true_file)[1:]
    ratio = (est / est.mean()) / (true / true.mean())
    return {"median_abs_ratio_minus_1": float(np.median(np.abs(ratio - 1))),
            "max_abs_ratio_minus_1": float(np.max(np.abs(ratio - 1))),
            "estimated": [float(v) for v in est], "true": [float(v) for v in true]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-sizes", default="2000,10000")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--noise", choices=("white", "coloured"), default="white",
                    help="the set's noise: white (relion_project), or coloured (noise.lorentzian_with_bump)")
    ap.add_argument("--options", default=None, help="named option sets (" + ", ".join(OPTIONS) + "); default: "
                    "all of them when no --row is given")
    ap.add_argument("--row", action="append", default=[], help="NAME:key=value,... (see the module docstring)")
    ap.add_argument("--base", default=BASE, help="TrainConfig options every --row starts from")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--step-timing", action="store_true", help="only measure ms/step, simulated vs cached real")
    ap.add_argument("--evaluate", type=Path, action="append", default=[],
                    help="only report a trained model directory on its test split (errors and uncertainty ranking)")
    ap.add_argument("--json", type=Path, default=None, help="output JSON (default WORK/realistic.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "realistic")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.train_sizes.split(",")]
    n_test, n_val = 1000, 500
    suffix = "" if args.noise == "white" else f"_{args.noise}"
    n_set = max(sizes) + n_test + n_val  # the set's size is fixed by the arguments (and named in its directory)
    star = make_relion_set(args.work / f"set_n{n_set}_b{args.box}_snr{args.snr:g}{suffix}", n_set,
                           args.box, args.snr, seed=3, noise=args.noise)
    ps = read_star(star)
    n = len(ps)
    test_fraction, val_fraction = n_test / n, n_val / n
    set_dir = star.parent
    common = dict(box=args.box, width=args.width, epochs=args.epochs, batch=args.batch, lr=args.lr,
                  val_fraction=val_fraction, test_fraction=test_fraction, seed=42)
    rows = []
    if args.options or not args.row:
        rows += [(name, OPTIONS[name]) for name in (args.options or ",".join(OPTIONS)).split(",")]
    for spec in args.row:
        name, _, opts = spec.partition(":")
        rows.append((name, {**parse_options(args.base, set_dir), **parse_options(opts, set_dir)}))
    if args.evaluate:
        for model_dir in args.evaluate:
            print(model_dir.name, json.dumps(held_out_report(ps, model_dir)), flush=True)
        return
    if args.step_timing:
        for name, opts in rows:
            cfg = TrainConfig(**{**common, "max_particles": sizes[0], **opts,
                                 "pretrain_steps": max(1, opts.get("pretrain_steps", 0))})
            print(name, json.dumps(step_timing(ps, cfg)), flush=True)
        return
    out_json = args.json or args.work / "realistic.json"
    results = {"set": str(star), "noise": args.noise, "particles": n, "box": args.box, "snr": args.snr, "epochs": args.epochs,
               "width": args.width, "batch": args.batch, "lr": args.lr, "rows": []}
    print(f"relion_project set: {n} particles, {args.box} px, SNR {args.snr}, {args.noise} noise; test {n_test} held out; "
          f"width {args.width}, {args.epochs} epochs (real), batch {args.batch}, lr {args.lr}")
    print(f"{'row':<34}{'train n':>8}{'pre steps':>10}{'epochs':>7}{'val best':>9}{'test med':>9}{'mean':>7}"
          f"{'p90':>7}{'s':>7}")
    for name, opts in rows:
        for size in sizes:
            cfg = TrainConfig(**{**common, "max_particles": size, **opts})
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            model = args.work / "models" / f"{slug}_{size}"
            if (model / "last.pt").exists():
                import shutil

                shutil.rmtree(model)
            t0 = time.time()
            trainer = Trainer(ps, model, cfg, torch.device("cpu"), progress=False)
            trainer.train()
            seconds = time.time() - t0
            row = {"row": name, "options": {k: v for k, v in cfg.to_dict().items() if k in opts},
                   "train_particles": len(trainer.split["train"]), "pretrain_steps": cfg.pretrain_steps,
                   "epochs": cfg.epochs, "best_val_median_deg": float(np.degrees(trainer.best)),
                   **held_out_report(ps, model), "train_seconds": round(seconds, 1),
                   "synthetic": {k: v for k, v in (trainer.pretraining.info or {}).items() if k != "noise_model"},
                   "noise_spectrum_vs_true": spectrum_agreement(trainer.pretraining.info, set_dir),
                   "log": trainer.log}
            results["rows"].append(row)
            print(f"{name:<34}{row['train_particles']:>8}{cfg.pretrain_steps:>10}{cfg.epochs:>7}"
                  f"{row['best_val_median_deg']:>9.1f}{row['test_median_deg']:>9.1f}{row['test_mean_deg']:>7.1f}"
                  f"{row['test_p90_deg']:>7.1f}{seconds:>7.0f}", flush=True)
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
