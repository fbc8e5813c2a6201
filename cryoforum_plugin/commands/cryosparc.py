"""``cryoforum cryosparc --project P --workspace W --train J12:particles [--predict J20:particles] [options]``."""

from cryoforum_plugin import manifest
from cryoforum_plugin.adapters.cryosparc import run


def add_args(parser):
    manifest.add_arguments(parser, "cryosparc")


def main(args):
    s = run(args)
    print(f"cryoSPARC job {s['job']}: {s['particles']} particles predicted, {s['confident']} confident, "
          f"{s['rejected']} rejected; model in {s['model']}")
