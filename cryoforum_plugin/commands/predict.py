"""``cryoforum predict --model MODEL_DIR --particles FILE --out OUT``."""

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin import manifest
from cryoforum_plugin.runtime import set_threads
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "predict")


def main(args):
    set_threads(args.threads)
    ps = read_particles(args.particles, project_dir=args.project_dir).with_half_sets()  # written with the poses
    out, pred = steps.predict(ps, args.model, device=args.device, batch=args.batch, tta=args.tta, workers=args.workers,
                              precision=args.precision, compile=args.compile, rewhiten=args.rewhiten)
    if out is None:  # a non-zero rank of a distributed run: rank 0 writes the merged output
        return
    written = steps.write_predictions(out, args.out, args.particles, args.format, project_dir=args.project_dir,
                                      domain_check=pred.domain_check, rewhitening=pred.rewhitening)
    print(f"predicted {len(ps)} particles in {pred.seconds:.1f} s ({pred.particles_per_second:,.0f} particles/s) "
          f"-> {', '.join(map(str, written))}")
