"""``cryoforum fsc MAP1 MAP2 [--mask M]``: curve, resolution at 0.143 and 0.5, PNG, CSV and JSON."""

import csv
import io
import json
from pathlib import Path

from cryoforum_plugin import manifest
from cryoforum_plugin.formats.atomic import write_text
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fsc import fsc_curve, fsc_table, resolution, soft_sphere_mask
from cryoforum_plugin.pipeline.plots import plot_fsc
from cryoforum_plugin.formats.mrc import read_map


def add_args(parser):
    manifest.add_arguments(parser, "fsc")


def main(args):
    m1, apix = read_map(args.map1)
    m2, _ = read_map(args.map2)
    if m1.shape != m2.shape:
        raise CryoforumError(f"the maps have different boxes ({m1.shape[0]} and {m2.shape[0]} px).", path=args.map2,
                             fix="resample one map to the other's box (e.g. relion_image_handler --new_box).")
    mask = None
    if args.mask:
        mask, _ = read_map(args.mask)
    elif args.mask_radius:
        mask = soft_sphere_mask(m1.shape[0], args.mask_radius)
    box = m1.shape[0]
    curve = fsc_curve(m1, m2, mask)
    result = {"map1": str(args.map1), "map2": str(args.map2), "box": box, "pixel_size_A": apix,
              "masked": mask is not None, "resolution_0.143_A": resolution(curve, box, apix, 0.143),
              "resolution_0.5_A": resolution(curve, box, apix, 0.5), "curve": fsc_table(curve, box, apix)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result["curve"][0]))
    writer.writeheader()
    writer.writerows(result["curve"])
    write_text(out / "fsc.csv", buf.getvalue())
    write_text(out / "fsc.json", json.dumps(result, indent=2))
    plot_fsc({"FSC": curve}, box, apix, out / "fsc.png")
    print(f"FSC 0.143: {result['resolution_0.143_A']:.2f} Å   FSC 0.5: {result['resolution_0.5_A']:.2f} Å   "
          f"-> {out}/fsc.png, fsc.csv, fsc.json")
