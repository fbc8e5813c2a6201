"""``cryoforum info FILE``: what a particle file holds."""

import json

import numpy as np

from cryoforum_plugin.physics import rotations
from cryoforum_plugin import manifest
from cryoforum_plugin.formats.files import read_particles


def add_args(parser):
    manifest.add_arguments(parser, "info")


def summarize(ps) -> dict:
    """A JSON-able summary of a ParticleSet: counts, box, pixel size, optics, poses, shifts, CTF."""
    info = {"file": str(ps.path), "format": ps.file_format, "particles": len(ps),
            "box_px": int(ps.box[0]) if len(ps) else None,
            "pixel_size_A": sorted(set(np.round(ps.pixel_size, 4).tolist())),
            "stacks": int(len(np.unique(ps.image_path))),
            "optics_groups": {int(g): int(c) for g, c in zip(*np.unique(ps.optics_group, return_counts=True))},
            "half_sets": {int(g): int(c) for g, c in zip(*np.unique(ps.half_set, return_counts=True))},
            "with_pose": int(ps.has_poses.sum()), "ctf": ps.ctf is not None}
    if ps.file_format == "star":
        info["star_version"] = ps.star_version
    if ps.has_poses.any():
        d = rotations.viewing_direction(ps.quat[ps.has_poses])
        tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
        # uniform directions have cos(tilt) uniform: compare the histogram with that expectation
        hist, _ = np.histogram(d[:, 2], bins=10, range=(-1, 1))
        info["poses"] = {"tilt_deg_quartiles": np.round(np.percentile(tilt, [25, 50, 75]), 1).tolist(),
                         "cos_tilt_histogram_10_bins": hist.tolist(),
                         "direction_coverage_ratio": round(float(hist.min() / max(hist.max(), 1)), 3)}
    info["shift_A_rms"] = round(float(np.sqrt((ps.shift_A**2).sum(1).mean())), 3) if len(ps) else 0.0
    if ps.ctf is not None:
        du = ps.ctf["defocus_u"]
        info["defocus_u_A_range"] = [round(float(du.min()), 1), round(float(du.max()), 1)]
    return info


def main(args):
    info = summarize(read_particles(args.file, project_dir=args.project_dir))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        print(f"{key:>24}: {value}")
