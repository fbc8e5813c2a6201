"""``cryoforum run --train P [--predict P2] [--reference MAP | --half-maps H1 H2] --out DIR``: the whole job
(train, predict, refine, select, reconstruct) through ``pipeline_job.pipeline``, with the RELION External job's
outputs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.pipeline import job as pipeline_job
from cryoforum_plugin import manifest
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "run")


def job_options(args) -> argparse.Namespace:
    """The pipeline options of a parsed ``run`` (or ``demo``) command line: every engine option as given."""
    return pipeline_options.options_from(args, refine=bool(args.refine), resume=bool(getattr(args, "resume", False)))


def main(args):
    if not args.train and not args.model:
        raise CryoforumError("nothing to train and no model.", fix="give --train PARTICLES, or --model DIR with "
                                                                   "--predict PARTICLES.")
    if args.train and args.model:
        raise CryoforumError("--model is for predict-only runs; with --train the model goes to OUT/model.",
                             fix="drop --model, or drop --train to predict with an existing model.")
    if args.reference and args.half_maps:
        raise CryoforumError("both --reference and --half-maps given.", fix="give one of them.")
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opts = job_options(args)
    train_set = read_particles(args.train, project_dir=args.project_dir) if args.train else None
    predict_path = args.predict or args.train
    if not predict_path:
        raise CryoforumError("nothing to predict.", fix="give --predict PARTICLES.")
    predict_set = read_particles(predict_path, project_dir=args.project_dir) if args.predict else train_set
    reference = (steps.Reference.from_files(args.reference, args.half_maps)
                 if opts.refine and (args.reference or args.half_maps) else None)
    model_dir = Path(args.model) if args.model else out / "model"
    result = pipeline_job.pipeline(opts, train_set=train_set, predict_set=predict_set, model_dir=model_dir,
                                   reference=reference)
    if result is None:  # a non-zero rank of a torchrun job
        return 0
    nodes = pipeline_job.write_outputs(result, out, predict_path, opts, fmt=args.format,
                                       reconstruct_map=args.reconstruct, project_dir=args.project_dir)
    summary = {"train": args.train, "predict": predict_path, "model": str(model_dir),
               "reference": result.reference.source if result.reference else None,
               "selection": result.selection.summary, "seconds": round(time.time() - start, 1),
               "outputs": [{"path": p, "kind": k} for p, k in nodes]}
    write_text(out / "run.json", json.dumps(summary, indent=2))
    how = f"{result.selection.summary['mode']}, {result.selection.summary['statistic']}"
    print(f"cryoforum run: {len(result.predicted)} particles predicted"
          f"{', refined' if result.refined is not None else ''}; {result.selection.kept} confident, "
          f"{result.selection.rejected} rejected ({how}) in "
          f"{summary['seconds']:.0f} s -> {out}")
    return 0
