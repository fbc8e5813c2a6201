#!/usr/bin/env python3
"""``predict --rewhiten`` against the model's stored whitening spectrum (issue 21's lever: re-estimate the noise
spectrum for new data "where that is what is right").

A model trained with ``--whiten on`` (tests/conftest.py's pre-training setting ``PRETRAIN_GRID`` from the embedded
map, 32 px at 8.71 Å, on ``--n-train`` simulated particles with coloured noise, an ice background, per-micrograph
levels and RELION normalisation) predicts new particles of the same protein: (1) made by the same recipe (another
seed), (2) with other noise colours (``--other-bfactors`` Å² instead of the training's 400 Å² fall-off; 0: white
noise under the ice background: another detector, ice, or dose), each with the stored spectrum and with
``rewhiten``. One line per seed and set
(network median / p90 error in degrees against the truth, and the colour of the new particles' own spectrum), then
the median over seeds.

    python benchmarks/rewhiten.py --seeds 11,12,13 --snr 1 --json benchmarks/out/rewhiten.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import PRETRAIN_GRID  # noqa: E402

from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.infer.predict import predict  # noqa: E402
from cryoforum_plugin.sim.dataset import simulate  # noqa: E402
from cryoforum_plugin.train.config import TrainConfig  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer  # noqa: E402

REALISTIC = dict(noise_bfactor=400.0, noise_floor=0.1, ice_std=0.5, particles_per_micrograph=50, normalise=True)


def errors(ps, model: Path, rewhiten: bool) -> tuple[np.ndarray, dict | None]:
    """(N,) degrees between the model's prediction (stored or re-estimated whitening) and the truth; the record."""
    pred = predict(ps, model, device="cpu", progress=False, rewhiten=rewhiten)
    return np.degrees(geodesic_errors(pred.quat, ps.quat)), pred.rewhitening


def run(seed: int, args, work: Path) -> list[dict]:
    sim = dict(box=32, snr=args.snr, max_shift=2.0, progress=False)
    simulate(DEFAULT_MAP, work / "train", n=args.n_train, seed=seed, **sim, **REALISTIC)
    train = read_star(work / "train" / "particles.star")
    cfg = TrainConfig(**{**PRETRAIN_GRID, "pretrain_steps": args.steps, "seed": seed}, from_map=str(DEFAULT_MAP),
                      whiten="on")
    Trainer(train, work / "model", cfg, torch.device("cpu"), progress=False).train()
    sets = {"same recipe": REALISTIC, **{f"noise fall-off {b:g} Å²": {**REALISTIC, "noise_bfactor": b}
                                         for b in (float(v) for v in args.other_bfactors.split(","))}}
    rows = []
    for name, realism in sets.items():
        out = work / name.replace(" ", "_")
        simulate(DEFAULT_MAP, out, n=args.n, seed=seed + 100, **sim, **realism)
        ps = read_star(out / "particles.star")
        row = {"seed": seed, "set": name, "snr": args.snr, "n": len(ps)}
        for rewhiten in (False, True):
            err, record = errors(ps, work / "model", rewhiten)
            key = "rewhiten" if rewhiten else "stored"
            row[f"{key}_median_deg"], row[f"{key}_p90_deg"] = float(np.median(err)), float(np.percentile(err, 90))
            if record:
                row["new_colour"], row["stored_colour"] = record["groups"][0]["colour"], record["stored_colour"]
                row["max_ratio"], row["min_ratio"] = record["groups"][0]["max_ratio"], record["groups"][0]["min_ratio"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="11,12,13")
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n", type=int, default=500, help="particles per new set")
    ap.add_argument("--steps", type=int, default=1000, help="pre-training steps of the whitening model")
    ap.add_argument("--other-bfactors", default="0,1200", help="the other sets' noise fall-offs, Å² (0: white)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            rows += run(seed, args, Path(tmp))
    print(f"\n{'set':<28}{'stored median':>14}{'rewhiten median':>16}{'stored p90':>11}{'rewhiten p90':>13}"
          f"{'new colour':>11}{'stored colour':>14}")
    for name in dict.fromkeys(r["set"] for r in rows):
        part = [r for r in rows if r["set"] == name]
        med = {k: float(np.median([r[k] for r in part])) for k in part[0] if isinstance(part[0][k], float)}
        print(f"{name:<28}{med['stored_median_deg']:>14.1f}{med['rewhiten_median_deg']:>16.1f}"
              f"{med['stored_p90_deg']:>11.1f}{med['rewhiten_p90_deg']:>13.1f}{med.get('new_colour', 0):>11.2f}"
              f"{med.get('stored_colour', 0):>14.2f}   (median over {len(part)} seeds)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
