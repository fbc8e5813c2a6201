"""``cryoforum train --particles FILE --out MODEL_DIR``."""

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin import manifest
from cryoforum_plugin.runtime import set_threads
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.train.config import TrainConfig


def add_args(parser):
    manifest.add_arguments(parser, "train")


def main(args):
    set_threads(args.threads)
    ps = read_particles(args.particles, project_dir=args.project_dir)
    steps.train(ps, args.out, TrainConfig.from_args(args), device=args.device, resume=args.resume,
                workers=args.workers, cache_gb=args.cache_gb, compile=args.compile)
