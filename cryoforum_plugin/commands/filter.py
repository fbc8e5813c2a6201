"""``cryoforum filter PREDICTED --out DIR``: confident and rejected subsets of the original particles."""

import json
from pathlib import Path

import numpy as np

from .. import manifest
from ..atomic import write_text
from ..cleanup import calibrate_threshold, keep_by_quantile, read_uncertainty, uncertainty_score
from ..errors import CryoforumError
from ..evaluation import errors
from ..particles import PRIOR_ANGLE_COLUMNS, ParticleSet, output_paths, read_particles, write_particles


def add_args(parser):
    manifest.add_arguments(parser, "filter")


def _validation_errors(ps: ParticleSet, model_dir) -> tuple[np.ndarray, np.ndarray]:
    """(rows, errors in radians) of the model's validation particles: predicted vs the input (prior) poses."""
    split = json.loads((Path(model_dir) / "split.json").read_text())
    config = json.loads((Path(model_dir) / "config.json").read_text())["config"]
    rows = np.nonzero(np.isin(ps.uid, np.array(split["val"]["uids"], dtype=np.uint64)))[0]
    table = ps.source.get("particles")
    if table is None or PRIOR_ANGLE_COLUMNS[0] not in table or len(rows) < 10:
        raise CryoforumError("--target-error needs the model's validation particles with their input poses.",
                             path=ps.path, fix="predict the particles the model was trained on (STAR output), "
                                               "or use --drop / --threshold.")
    from .. import geometry

    prior = geometry.relion_euler_to_quat(*table.loc[rows, list(PRIOR_ANGLE_COLUMNS)].to_numpy(float).T)
    return rows, errors(ps.quat[rows], prior, config["sym"])


def select(ps: ParticleSet, unc: dict, args) -> tuple[np.ndarray, dict]:
    """Keep mask and a summary of how it was chosen."""
    score = uncertainty_score(unc, args.statistic)
    summary = {"statistic": args.statistic}
    if args.target_error is not None:
        if not args.model:
            raise CryoforumError("--target-error needs --model.", fix="add --model MODEL_DIR.")
        rows, err = _validation_errors(ps, args.model)
        t = calibrate_threshold(score[rows], err, np.radians(args.target_error))
        if t is None:
            raise CryoforumError(f"no threshold keeps the validation median error below {args.target_error}°.",
                                 fix="raise --target-error or train a better model.")
        keep = score <= t
        summary.update(mode="target_error", target_error_deg=args.target_error, threshold=t,
                       validation_particles=int(len(rows)))
    elif args.threshold is not None:
        keep = score <= args.threshold
        summary.update(mode="threshold", threshold=args.threshold)
    else:
        keep = keep_by_quantile(score, args.drop)
        summary.update(mode="quantile", drop=args.drop)
    return keep, summary


def main(args):
    ps = read_particles(args.predicted, project_dir=args.project_dir)
    unc = read_uncertainty(ps, args.uncertainty)
    keep, summary = select(ps, unc, args)
    out = Path(args.out)
    written = []
    for name, mask in (("confident", keep), ("rejected", ~keep)):
        for path in output_paths(args.predicted, out, name, args.format):
            write_particles(ps.subset(mask), path, relative_to=out.resolve(), project_dir=args.project_dir)
            written.append(str(path))
    summary.update(input=str(args.predicted), particles=len(ps), kept=int(keep.sum()), rejected=int((~keep).sum()),
                   outputs=written)
    write_text(out / "filter.json", json.dumps(summary, indent=2))
    print(f"kept {summary['kept']} / {len(ps)} particles ({summary['mode']}, {args.statistic}) -> {', '.join(written)}")
