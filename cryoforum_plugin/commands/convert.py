"""``cryoforum convert IN OUT``: .cs <-> .star (poses, shifts, CTF, optics groups, half-sets, uids)."""

from pathlib import Path

from cryoforum_plugin import manifest
from cryoforum_plugin.formats.files import read_particles, write_particles


def add_args(parser):
    manifest.add_arguments(parser, "convert")


def main(args):
    ps = read_particles(args.input, project_dir=args.project_dir)
    out = Path(args.output)
    if out.resolve() == Path(args.input).resolve():
        from cryoforum_plugin.errors import CryoforumError

        raise CryoforumError("output would overwrite the input.", path=out, fix="choose another output name.")
    write_particles(ps, out, relative_to=out.resolve().parent, project_dir=args.project_dir,
                    absolute_paths=args.absolute_paths)
    print(f"wrote {len(ps)} particles to {out}")
