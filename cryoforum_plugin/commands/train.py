"""``cryoforum train --particles FILE --out MODEL_DIR``."""

from .. import jobs, manifest
from ..devices import set_threads
from ..particles import read_particles
from ..train_config import TrainConfig


def add_args(parser):
    manifest.add_arguments(parser, "train")


def main(args):
    set_threads(args.threads)
    ps = read_particles(args.particles, project_dir=args.project_dir)
    jobs.train(ps, args.out, TrainConfig.from_args(args), device=args.device, resume=args.resume,
               workers=args.workers, cache_gb=args.cache_gb)
