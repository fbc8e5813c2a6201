"""``cryoforum simulate MAP --n N --box B --snr S --out DIR`` (``--realistic``: particles like real ones)."""

from cryoforum_plugin import manifest
from cryoforum_plugin.sim.dataset import simulate
from cryoforum_plugin.sim.realism import REALISTIC
from cryoforum_plugin.runtime import resolve_device

OWN = frozenset({"map", "out", "angles", "device", "realistic"})
"""Options that are not simulate()'s keyword of the same name."""


def add_args(parser):
    manifest.add_arguments(parser, "simulate")
    parser.set_defaults(**{name: None for name in REALISTIC})  # None: not given (--realistic or the default fills it)


def resolved(args) -> dict:
    """simulate()'s keywords: each option as given, else its --realistic value (with --realistic), else its
    plugin.yaml default; so an option given on the command line always wins, even at its default value."""
    defaults = manifest.defaults("simulate")
    out = {}
    for name in defaults:
        if name in OWN:
            continue
        value = getattr(args, name)
        if value is None and name in REALISTIC:
            value = REALISTIC[name] if args.realistic else defaults[name]
        out[name] = value
    return out


def main(args):
    r = simulate(args.map, args.out, angles_file=args.angles, device=resolve_device(args.device), **resolved(args))
    print(f"simulated {r.n} particles, {r.box} px at {r.pixel_size:.4f} Å/px, noise std {r.noise_std:.4g}, "
          f"in {r.seconds:.1f} s -> {r.out_dir}/particles.star, particles.cs, truth.star")
