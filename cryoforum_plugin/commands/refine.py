"""``cryoforum refine --particles P --reference MAP --out DIR``: poses and shifts refined against a map."""

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin import manifest
from cryoforum_plugin.runtime import set_threads
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "refine")


def main(args):
    set_threads(args.threads)
    ps = read_particles(args.particles, project_dir=args.project_dir).with_half_sets()  # gold standard, written back
    reference = steps.Reference.from_files(args.reference, args.half_maps)
    refined, result = steps.refine(ps, reference, sym=args.sym, global_search=args.global_search, trust=args.trust,
                                   search_radius=args.search_radius, max_shift=args.max_shift,
                                   resolution=args.resolution, batch=args.batch, device=args.device)
    written = steps.write_refined(refined, result, args.out, args.particles, args.format, project_dir=args.project_dir,
                                  extra={"reference": reference.source})
    print(f"refined {len(ps)} particles ({int(result.global_searched.sum())} by global search) in "
          f"{result.seconds:.1f} s ({result.particles_per_second:,.1f} particles/s) -> "
          f"{', '.join(map(str, written))}")
