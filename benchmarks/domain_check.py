"""The domain check's margins: a model trained on one protein, its verdict on held-out particles of the same
simulated data set (new seeds) and on β-galactosidase at the same pixel size, box, SNR and CTF.

The model is tests/conftest.py's pre-training setting (``PRETRAIN_GRID``: 500 steps from the default map, 32 px at
8.71 Å) on 300 particles; domain.json comes from its validation particles (``steps.write_domain_reference``, what
``steps.train`` calls); each new set has ``--n`` particles. One line per verdict with the numbers the check
compares (``infer.domain.check_domain``), then the range per kind. ``--realistic``: coloured noise with an ice
background, per-micrograph noise levels and RELION normalisation (``simulate``'s realism options) in every set.

    python benchmarks/domain_check.py --snr 10,0.1 --seeds 11,12,13,14 --threads 1,2
    python benchmarks/domain_check.py --snr 0.1 --realistic --n-train 1000 --n 300
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import PRETRAIN_GRID  # noqa: E402

from cryoforum_plugin.data import BETAGAL_MAP, DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.formats.mrc import read_map, write_mrc  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.physics.resample import map_on_particle_grid  # noqa: E402
from cryoforum_plugin.pipeline import steps  # noqa: E402
from cryoforum_plugin.progress import Events  # noqa: E402
from cryoforum_plugin.sim.dataset import simulate  # noqa: E402
from cryoforum_plugin.train.config import TrainConfig  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer  # noqa: E402

REALISTIC = dict(noise_bfactor=400.0, noise_floor=0.1, ice_std=0.5, particles_per_micrograph=50, normalise=True)
KEYS = ("signal_shape", "signal_shape_low", "snr_ratio", "noise_shape", "fom_below_model_p10")


class Quiet(Events):
    def message(self, text: str) -> None:
        pass

    def progress(self, text: str, final: bool = False) -> None:
        pass


def run(snr: float, seeds, n: int, n_train: int, realistic: bool, work: Path) -> list[dict]:
    sim = dict(box=32, snr=snr, max_shift=2.0, progress=False, **(REALISTIC if realistic else {}))
    simulate(DEFAULT_MAP, work / "train", n=n_train, seed=5, **sim)
    ps = read_star(work / "train" / "particles.star")
    trainer = Trainer(ps, work / "model", TrainConfig(**PRETRAIN_GRID, from_map=str(DEFAULT_MAP)),
                      torch.device("cpu"), progress=False)
    trainer.train()
    steps.write_domain_reference(ps, work / "model", device="cpu", events=Quiet())
    _, apix = read_map(DEFAULT_MAP)
    write_mrc(work / "bgal.mrc", map_on_particle_grid(str(BETAGAL_MAP), 64, apix).numpy(), apix)
    sets = [("held-out (test split)", ps.subset(trainer.split["test"]))]
    for seed in seeds:
        for kind, volume in (("same protein", DEFAULT_MAP), ("beta-galactosidase", work / "bgal.mrc")):
            out = work / f"{kind[:4]}{seed}"
            simulate(volume, out, n=n, seed=seed, **sim)
            sets.append((f"{kind} seed {seed}", read_star(out / "particles.star")))
    rows = []
    for name, target in sets:
        _, pred = steps.predict(target, work / "model", device="cpu", workers=0, events=Quiet())
        check = pred.domain_check
        row = {"set": name, "snr": snr, "realistic": realistic, "threads": torch.get_num_threads(),
               "fits": check["fits"], **{k: check.get(k) for k in KEYS}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snr", default="10,0.1")
    ap.add_argument("--seeds", default="11,12,13,14")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--n", type=int, default=200, help="particles per new set")
    ap.add_argument("--n-train", type=int, default=300,
                    help="particles of the training set (20 %% of them validation: PRETRAIN_GRID)")
    ap.add_argument("--realistic", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for snr in [float(s) for s in args.snr.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                rows += run(snr, [int(s) for s in args.seeds.split(",")], args.n, args.n_train, args.realistic,
                            Path(tmp))
    for kind in ("held-out", "same protein", "beta-galactosidase"):
        part = [r for r in rows if r["set"].startswith(kind)]
        span = {k: (min(r[k] for r in part), max(r[k] for r in part)) for k in KEYS if part[0][k] is not None}
        print(f"{kind}: fits {sorted({r['fits'] for r in part})}, " + ", ".join(
            f"{k} {lo:.3f}-{hi:.3f}" for k, (lo, hi) in span.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
