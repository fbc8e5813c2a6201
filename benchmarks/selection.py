"""Which statistic should the job select by? Junk rejection of every selection statistic on a finished job.

Reads a job's ``refined.star`` (the output of ``cryoforum run``, the RELION External job or ``cryoforum demo``'s
``job/``), the simulation's ``truth.star`` (junk labels, true poses) and the job's model directory (its
validation and test splits). For each statistic (``cryoforum filter --statistic``): AUROC for junk, the fraction
of each kind of junk removed and of good particles kept when dropping ``--drop``, and the median refined error of
the kept good particles, on the validation split (where the default is chosen) and on the test split (reported).

    python benchmarks/selection.py --job demo_out/job --truth demo_out/simulated/truth.star --json sel.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryoforum_plugin.infer.select import auroc, keep_by_quantile, read_uncertainty, uncertainty_score  # noqa: E402
from cryoforum_plugin.infer.metrics import geodesic_errors  # noqa: E402
from cryoforum_plugin.train.model_dir import ModelDir  # noqa: E402
from cryoforum_plugin.formats.star import read_star  # noqa: E402
from cryoforum_plugin.sim.dataset import JUNK_KINDS  # noqa: E402

STATISTICS = ("trace", "max", "both", "refine", "refine_trace")


def split_rows(job: Path, uid: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of the model's validation and test particles in a set with these uids."""
    model = ModelDir(job / "model")
    return {part: np.nonzero(np.isin(uid, model.split_uids(part)))[0] for part in ("val", "test")}


def evaluate(score: np.ndarray, junk: np.ndarray, err_deg: np.ndarray, drop: float) -> dict:
    """Selection quality of one statistic on one part: AUROC, junk removed per kind, good kept, kept error."""
    keep = keep_by_quantile(score, drop)
    good = junk == 0
    row = {"auroc_junk": auroc(score, ~good), "junk_removed": float((~keep[~good]).mean()) if (~good).any() else None,
           "good_kept": float(keep[good].mean()), "kept_good_median_deg": float(np.median(err_deg[good & keep]))}
    for kind, name in JUNK_KINDS.items():
        sel = junk == kind
        if sel.any():
            row[f"removed_{name}"] = f"{int((~keep[sel]).sum())}/{int(sel.sum())}"
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", type=Path, required=True, help="job output directory (refined.star, model/)")
    ap.add_argument("--truth", type=Path, required=True, help="truth.star of the simulation (junk labels)")
    ap.add_argument("--drop", type=float, default=0.25)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    refined, truth = read_star(args.job / "refined.star"), read_star(args.truth)
    order = {u: i for i, u in enumerate(truth.uid)}
    t = np.array([order[u] for u in refined.uid])
    junk = truth.junk[t]
    err = np.degrees(geodesic_errors(refined.quat, truth.quat[t]))
    unc = read_uncertainty(refined)
    rows = []
    for part, r in split_rows(args.job, refined.uid).items():
        for stat in STATISTICS:
            score = uncertainty_score(unc, stat)[r]
            rows.append({"part": part, "statistic": stat, "particles": int(len(r)),
                         **evaluate(score, junk[r], err[r], args.drop)})
    kinds = [k for k in rows[0] if k.startswith("removed_")]
    print(f"{'part':<5} {'statistic':<13} {'AUROC':>6} {'junk out':>9} {'good kept':>10} {'kept err':>9}  "
          + "  ".join(kinds))
    for r in rows:
        print(f"{r['part']:<5} {r['statistic']:<13} {r['auroc_junk']:6.3f} {r['junk_removed']:9.1%} "
              f"{r['good_kept']:10.1%} {r['kept_good_median_deg']:8.2f}°  " + "  ".join(r[k] for k in kinds))
    if args.json:
        args.json.write_text(json.dumps({"job": str(args.job), "drop": args.drop, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
