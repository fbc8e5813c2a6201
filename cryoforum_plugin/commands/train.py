"""``cryoforum train --particles FILE --out MODEL_DIR``."""

from .. import manifest
from ..particles import read_particles
from ..training import Trainer, TrainConfig
from ._common import resolve_device, set_threads


def add_args(parser):
    manifest.add_arguments(parser, "train")


def run(args, abort_check=None) -> dict:
    """Train from parsed arguments; returns the summary (also used by the adapters)."""
    set_threads(args.threads)
    ps = read_particles(args.particles, project_dir=args.project_dir)
    ps.validate_images()
    trainer = Trainer(ps, args.out, TrainConfig.from_args(args), resolve_device(args.device), abort_check=abort_check,
                      workers=args.workers, cache_gb=args.cache_gb)
    if args.resume and trainer.resume():
        print(f"resumed from {args.out}/last.pt at epoch {trainer.epoch}")
    summary = trainer.train()
    if trainer.rank != 0:
        return summary
    print(f"best validation median error {summary['best_val_median_rad']:.4f} rad "
          f"({summary['best_val_median_rad'] * 57.29578:.2f}°) -> {args.out}/best.pt")
    return summary


def main(args):
    run(args)
