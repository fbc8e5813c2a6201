"""``cryoforum predict --model MODEL_DIR --particles FILE --out OUT``."""

from pathlib import Path

from .. import manifest
from ..atomic import atomic_path
from ..particles import output_paths, read_particles, write_particles
from ..prediction import predict, uncertainty_dataset, with_predictions
from ._common import resolve_device, set_threads


def add_args(parser):
    manifest.add_arguments(parser, "predict")


def write_predictions(ps, out_dir, input_path, fmt: str = "auto", stem: str = "predicted",
                      project_dir=None) -> list[Path]:
    """Write a predicted ParticleSet as STAR and/or .cs (+ the uid-keyed uncertainty sidecar for .cs)."""
    written = []
    for path in output_paths(input_path, out_dir, stem, fmt):
        write_particles(ps, path, relative_to=Path(out_dir).resolve(), project_dir=project_dir)
        written.append(path)
        if path.suffix == ".cs":
            side = path.with_name(f"{stem}_uncertainty.cs")
            with atomic_path(side) as tmp:
                uncertainty_dataset(ps).save(str(tmp))
            written.append(side)
    return written


def run(args, abort_check=None):
    set_threads(args.threads)
    ps = read_particles(args.particles, project_dir=args.project_dir)
    ps.validate_images()
    pred = predict(ps, args.model, device=resolve_device(args.device), batch=args.batch, tta=args.tta,
                   abort_check=abort_check, workers=args.workers)
    if pred is None:  # a non-zero rank of a distributed run: rank 0 writes the merged output
        return None, None
    out = with_predictions(ps, pred)
    written = write_predictions(out, args.out, args.particles, args.format, project_dir=args.project_dir)
    print(f"predicted {len(ps)} particles in {pred.seconds:.1f} s ({pred.particles_per_second:,.0f} particles/s) "
          f"-> {', '.join(map(str, written))}")
    return out, pred


def main(args):
    run(args)
