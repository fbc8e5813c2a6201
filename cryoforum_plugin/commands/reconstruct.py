"""``cryoforum reconstruct PARTICLES --out MAP [--halves] [--sym G] [--weights COLUMN]``."""

import time
from pathlib import Path

import numpy as np

from cryoforum_plugin import manifest
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fsc import fsc_curve, resolution
from cryoforum_plugin.formats.mrc import write_mrc
from cryoforum_plugin.formats.cs import attach_uncertainty_sidecar, uncertainty_sidecar_path
from cryoforum_plugin.formats.columns import FOM_COLUMN, FOM_CS, UNCERTAINTY_CS, UNCERTAINTY_STAR
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.physics.reconstruct import reconstruct
from cryoforum_plugin.runtime import resolve_device


def add_args(parser):
    manifest.add_arguments(parser, "reconstruct")


UNCERTAINTY_NAMES = {FOM_COLUMN, FOM_CS, *UNCERTAINTY_STAR.values(), *UNCERTAINTY_CS.values()}


def particle_weights(ps, column: str) -> np.ndarray:
    """Per-particle weights from a numeric per-particle column, named as in STAR or .cs (``ParticleSet.column``:
    rlnParticleFigureOfMerit and cryoforum/fom name the same figure of merit in either format). For a .cs
    prediction without the uncertainty fields, its uid-keyed sidecar is read for them."""
    w = ps.column(column)
    if w is None and ps.file_format == "cs" and column in UNCERTAINTY_NAMES:
        sidecar = uncertainty_sidecar_path(ps)
        if sidecar is not None and sidecar.exists():
            w = attach_uncertainty_sidecar(ps, sidecar).column(column)
    if w is None:
        raise CryoforumError(f"no column '{column}' for --weights.", path=ps.path,
                             fix="name a numeric per-particle column of the particle file, "
                                 "e.g. rlnParticleFigureOfMerit.")
    w = np.asarray(w, dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        r = int(np.argmax(~np.isfinite(w) | (w < 0)))
        raise CryoforumError(f"weight column '{column}' has a negative or NaN value.", path=ps.path, row=r,
                             fix="weights must be finite and >= 0.")
    return w


def main(args):
    start = time.time()
    ps = read_particles(args.particles, project_dir=args.project_dir).with_half_sets()  # --halves: as the refinement
    ps.validate_images()
    if not args.ctf:
        ps.ctf = None
    weights = particle_weights(ps, args.weights) if args.weights else None
    maps = reconstruct(ps, sym=args.sym, weights=weights, halves=args.halves, batch=args.batch,
                       device=resolve_device(args.device))
    out = Path(args.out)
    apix, box = float(ps.pixel_size[0]), int(ps.box[0])
    write_mrc(out, maps["full"], apix)
    print(f"wrote {out} ({box} px at {apix:.4f} Å/px) from {len(ps)} particles in {time.time() - start:.1f} s")
    if args.halves:
        for h in ("half1", "half2"):
            write_mrc(out.with_name(f"{out.stem}_{h}.mrc"), maps[h], apix)
        curve = fsc_curve(maps["half1"], maps["half2"])
        print(f"half-map FSC 0.143: {resolution(curve, box, apix, 0.143):.2f} Å")
