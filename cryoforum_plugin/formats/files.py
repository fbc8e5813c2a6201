"""Particle files by extension: ``.star`` (star.py) or ``.cs`` (cs.py) read into and written from a ParticleSet."""

from __future__ import annotations

from pathlib import Path

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.cs import read_cs, write_cs
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.formats.star import read_star, write_star


def read_particles(path, project_dir=None) -> ParticleSet:
    """Read a ``.star`` or ``.cs`` particle file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        return read_star(path, project_dir=project_dir)
    if suffix == ".cs":
        return read_cs(path, project_dir=project_dir)
    raise CryoforumError(f"unknown particle file type '{suffix}'.", path=path, fix="pass a .star or .cs file.")


def write_particles(ps: ParticleSet, path, relative_to=None, project_dir=None, absolute_paths: bool = False) -> Path:
    """Write as ``.star`` or ``.cs`` by the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        return write_star(ps, path, relative_to=relative_to, absolute_paths=absolute_paths)
    if suffix == ".cs":
        return write_cs(ps, path, project_dir=project_dir)
    raise CryoforumError(f"unknown particle file type '{suffix}'.", path=path, fix="name the output .star or .cs.")


def output_paths(input_path, out_dir, stem: str, fmt: str = "auto") -> list[Path]:
    """Output file names for ``--format star|cs|both`` (``auto``: the input's format)."""
    if fmt == "auto":
        fmt = "cs" if Path(input_path).suffix.lower() == ".cs" else "star"
    exts = {"star": [".star"], "cs": [".cs"], "both": [".star", ".cs"]}[fmt]
    return [Path(out_dir) / f"{stem}{ext}" for ext in exts]
