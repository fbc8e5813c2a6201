"""``cryoforum filter PREDICTED --out DIR``: confident and rejected subsets of the original particles."""

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin import manifest
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "filter")


def main(args):
    ps = read_particles(args.predicted, project_dir=args.project_dir)
    selection = steps.select(ps, statistic=args.statistic, drop=args.drop, threshold=args.threshold,
                             target_error=args.target_error, model_dir=args.model, uncertainty=args.uncertainty)
    written = steps.write_selection(ps, selection, args.out, args.predicted, args.format, project_dir=args.project_dir)
    how = f"{selection.summary['mode']}, {selection.summary['statistic']}"
    print(f"kept {selection.kept} / {len(ps)} particles ({how}) -> {', '.join(written)}")
