"""``cryoforum simulate MAP --n N --box B --snr S --out DIR``."""

from cryoforum_plugin import manifest
from cryoforum_plugin.sim.dataset import simulate
from cryoforum_plugin.runtime import resolve_device


def add_args(parser):
    manifest.add_arguments(parser, "simulate")


def main(args):
    r = simulate(args.map, args.out, n=args.n, box=args.box, snr=args.snr, orientations=args.orientations,
                 sym=args.sym, restrict_to_asu=args.restrict_to_asu, angles_file=args.angles,
                 max_shift=args.max_shift, defocus_min=args.defocus_min, defocus_max=args.defocus_max,
                 astigmatism=args.astigmatism, voltage=args.voltage, cs=args.cs, amp_contrast=args.amp_contrast,
                 ctf_from=args.ctf_from, no_ctf=args.no_ctf, junk_fraction=args.junk_fraction,
                 junk_map=args.junk_map, seed=args.seed, chunk=args.chunk, device=resolve_device(args.device))
    print(f"simulated {r.n} particles, {r.box} px at {r.pixel_size:.4f} Å/px, noise std {r.noise_std:.4g}, "
          f"in {r.seconds:.1f} s -> {r.out_dir}/particles.star, particles.cs, truth.star")
