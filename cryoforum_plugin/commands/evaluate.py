"""``cryoforum evaluate --predicted FILE --truth FILE [--sym G]``."""

import json

import numpy as np

from cryoforum_plugin import manifest
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.infer.metrics import geodesic_errors, match_rows, summarize
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "evaluate")


def run(args) -> dict:
    pred = read_particles(args.predicted)
    truth = read_particles(args.truth)
    pi, ti = match_rows(pred, truth)
    if args.split != "all":
        if not args.model:
            raise CryoforumError("--split needs --model (the split is stored in the model directory).",
                                 fix="add --model MODEL_DIR.")
        keep = np.isin(pred.uid[pi], ModelDir(args.model).split_uids(args.split))
        pi, ti = pi[keep], ti[keep]
    ok = pred.has_poses[pi] & truth.has_poses[ti]
    result = summarize(geodesic_errors(pred.quat[pi[ok]], truth.quat[ti[ok]], args.sym), args.sym)
    result.update(predicted=str(args.predicted), truth=str(args.truth), split=args.split)
    if args.out:
        write_text(args.out, json.dumps(result, indent=2))
    return result


def main(args):
    r = run(args)
    if r["n"] == 0:
        print("no particles to evaluate")
        return 1
    print(f"{r['n']} particles ({r['split']}, {r['sym']}): median {r['median_rad']:.4f} rad ({r['median_deg']:.2f}°), "
          f"mean {r['mean_rad']:.4f} rad ({r['mean_deg']:.2f}°), "
          f"p25/p75 {r['percentiles_deg'][25]:.1f}°/{r['percentiles_deg'][75]:.1f}°; chance median "
          f"{r['chance_median_rad']:.2f} rad")
