"""``cryoforum watch --model DIR --reference MAP --in PATH --out DIR [--until-idle S] [--batch-size N]``: poses and
clean-up for particles as they arrive (``pipeline.watch.Watcher``); SIGTERM ends it after the current batch."""

from __future__ import annotations

import signal

from cryoforum_plugin import manifest
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.pipeline.stream import ParticleFiles
from cryoforum_plugin.pipeline.watch import Watcher, WatchSettings
from cryoforum_plugin.progress import Events


def add_args(parser):
    manifest.add_arguments(parser, "watch")


def main(args):
    if bool(args.reference) == bool(args.half_maps):
        raise CryoforumError("watch refines every particle against one reference.",
                             fix="give --reference MAP (the consensus map) or --half-maps HALF1 HALF2.")
    source_path = getattr(args, "in")
    events = Events()
    source = ParticleFiles(source_path, batch_size=args.batch_size, settle=args.settle, project_dir=args.project_dir,
                           events=events)
    settings = WatchSettings(batch_size=args.batch_size, settle=args.settle, poll=args.poll,
                             until_idle=args.until_idle, map_every=args.map_every, reconstruct=args.reconstruct)
    watcher = Watcher(source, args.out, args.model, steps.Reference.from_files(args.reference, args.half_maps),
                      pipeline_options.options_from(args), settings, events=events, project_dir=args.project_dir)
    stopping = []

    def on_sigterm(signum, frame):
        events.message("[watch] SIGTERM: stopping after the current batch")
        stopping.append(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        status = watcher.run(stop=lambda: bool(stopping))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"cryoforum watch: {status['particles_done']:,} particles in {status['batches']} batches "
          f"({status['confident']:,} confident, {status['rejected']:,} rejected) -> {args.out}")
    return 0
