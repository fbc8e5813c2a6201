"""``cryoforum report --predicted P --truth T --out DIR``: does the uncertainty mean something? Numbers,
reconstructions before/after filtering (the paper's Figure 4), figures and a self-contained HTML report."""

from cryoforum_plugin.pipeline import evaluation
from cryoforum_plugin import manifest
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "report")


def main(args):
    refined = read_particles(args.refined, project_dir=args.project_dir) if args.refined else None
    s = evaluation.report(read_particles(args.predicted, project_dir=args.project_dir),
                          read_particles(args.truth, project_dir=args.project_dir), args.out, refined=refined,
                          true_map=args.map, model_dir=args.model, split=args.split, sym=args.sym,
                          statistic=args.statistic, drop=args.drop, error_threshold=args.error_threshold,
                          reconstruct_maps=args.reconstruct, device=args.device)
    for k, v in s["headline"].items():
        print(f"{k:>60}: {v}")
    for name, r in (s.get("reconstructions") or {}).items():
        print(f"{name:>35}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    print(f"-> {args.out}/report.html")
