"""The margins of the suite's learning tests: the pre-training setting of tests/conftest.py (``PRETRAIN_GRID``)
trained over seeds and thread counts, with what the tests assert (held-out median error; AUROC of the figure of
merit for new particles against pure-noise images and projections of another map).

A different CPU, BLAS or thread count changes the float order, which acts like another seed: a learning test's
threshold must hold over all of them with margin. This prints one line per run and the spread.

    python benchmarks/learning_margins.py --seeds 3,4,5,6,7 --threads 1,2 --json benchmarks/out/learning_margins.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import PRETRAIN_GRID  # noqa: E402

from cryoforum_plugin.infer.select import auroc, spearman  # noqa: E402
from cryoforum_plugin.data import DEFAULT_MAP  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.infer.predict import predict  # noqa: E402
from cryoforum_plugin.sim.dataset import simulate  # noqa: E402
from cryoforum_plugin.train.config import TrainConfig  # noqa: E402
from cryoforum_plugin.train.trainer import Trainer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="3,4,5,6,7")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp())
    # the suite's sets: conftest.small_sim_set and the junk set of tests/test_grid_head.py
    simulate(DEFAULT_MAP, work / "sim", n=300, box=32, snr=10.0, max_shift=2.0, seed=5, progress=False)
    simulate(DEFAULT_MAP, work / "junk", n=200, box=32, snr=10.0, max_shift=2.0, seed=6, junk_fraction=0.6,
             progress=False)
    ps, new = read_star(work / "sim" / "particles.star"), read_star(work / "junk" / "particles.star")
    junk = read_star(work / "junk" / "truth.star").junk
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.time()
            model = work / f"m{threads}_{seed}"
            trainer = Trainer(ps, model, TrainConfig(**{**PRETRAIN_GRID, "seed": seed}, from_map=str(DEFAULT_MAP)),
                              torch.device("cpu"), progress=False)
            trainer.train()
            test = trainer.split["test"]
            pred = predict(ps.subset(test), model, progress=False)
            err = np.degrees(geodesic_errors(pred.quat, ps.quat[test]))
            fom = predict(new, model, progress=False).fom
            good = junk == 0
            row = {"threads": threads, "seed": seed, "median_deg": float(np.median(err)),
                   "p90_deg": float(np.percentile(err, 90)), "spearman": float(spearman(-pred.fom, err)),
                   "auroc_noise": auroc(-fom[good | (junk == 1)], junk[good | (junk == 1)] == 1),
                   "auroc_other_map": auroc(-fom[good | (junk == 3)], junk[good | (junk == 3)] == 3),
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for key in ("median_deg", "p90_deg", "spearman", "auroc_noise", "auroc_other_map"):
        values = [r[key] for r in rows]
        print(f"{key:<16} {min(values):.3f} .. {max(values):.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": PRETRAIN_GRID, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
