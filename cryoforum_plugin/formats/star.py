"""RELION particle STAR files (3.0 single block, 3.1/4/5 optics + particles): reader and writer of ParticleSet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryoforum_plugin.formats.atomic import atomic_path
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import stack_shape
from cryoforum_plugin.formats.columns import (
    ANGLE_COLUMNS, CORE_STAR_COLUMNS, CTF_DEFAULTS, LEGACY_ORIGIN_COLUMNS, LEGACY_PIXEL_COLUMNS, STAR_CTF, STAR_NAME,
    TYPED_STAR_COLUMNS, UID_COLUMN,
)
from cryoforum_plugin.formats.particles import (
    ParticleSet, check_box, check_quats, deterministic_uids, file_poses, quats_from_file, resolve_all, typed_columns,
    typed_from_columns,
)

_OPTICS_CTF = ("voltage", "cs", "amp_contrast")
"""CTF parameters written to the optics table (the others per particle)."""
_IMAGE_NAME, _GROUP, _HALF = STAR_NAME["image_path"], STAR_NAME["optics_group"], STAR_NAME["half_set"]
_PIXEL, _BOX, _ORIGIN = STAR_NAME["pixel_size"], STAR_NAME["box"], STAR_NAME["shift_A"]
_OPTICS_COLUMNS = (_PIXEL, _BOX, *LEGACY_PIXEL_COLUMNS, *(STAR_CTF[k] for k in _OPTICS_CTF))
"""Per-group columns: moved to a new optics table when the set's own is not kept."""


def _numeric_columns(particles: pd.DataFrame) -> dict[str, np.ndarray]:
    """Numeric per-particle columns other than those held by the ParticleSet's own or typed fields."""
    skip = CORE_STAR_COLUMNS | set(TYPED_STAR_COLUMNS)
    return {c: particles[c].to_numpy() for c in particles.columns
            if c not in skip and pd.api.types.is_numeric_dtype(particles[c])}


def read_star(path, project_dir=None) -> ParticleSet:
    """Read a RELION 3.0 (single block) or 3.1/4/5 (optics + particles) particle STAR file.

    Relative image names are resolved against ``project_dir`` if given, else the STAR file's directory,
    else the current directory (RELION's project directory), whichever holds the stack.
    """
    path = Path(path)
    if not path.exists():
        raise CryoforumError("particle file not found.", path=path, fix="check the path.")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted parser errors
        raise CryoforumError(f"cannot parse as a STAR file ({exc}).", path=path,
                             fix="pass a RELION particle STAR file.") from None
    optics = blocks.get("optics")
    particles = blocks.get("particles")
    if particles is None:
        tables = [(k, v) for k, v in blocks.items() if isinstance(v, pd.DataFrame) and _IMAGE_NAME in v]
        if not tables:
            raise CryoforumError("no particle table with rlnImageName.", path=path,
                                 fix="pass a particle STAR file (e.g. run_data.star or particles.star), "
                                     "not an optimiser, model or micrograph file.")
        name, particles = tables[0]
    else:
        name = "particles"
    if not isinstance(particles, pd.DataFrame) or _IMAGE_NAME not in particles:
        raise CryoforumError("the particle table has no rlnImageName column.", path=path,
                             fix="the STAR file must list particle images (index@stack.mrcs).")
    particles = particles.reset_index(drop=True)
    n = len(particles)
    if optics is not None and not isinstance(optics, pd.DataFrame):
        optics = None
    version = "3.1" if optics is not None else "3.0"

    names = particles[_IMAGE_NAME].astype(str).to_numpy()
    split = np.char.partition(names.astype(str), "@")
    bad = np.nonzero((split[:, 1] != "@") | ~np.char.isdigit(split[:, 0]))[0]
    if len(bad):
        raise CryoforumError(f"image name '{names[bad[0]]}' is not of the form index@stack.",
                             path=path, row=int(bad[0]), fix="use RELION image names like 000001@Extract/stack.mrcs.")
    index = split[:, 0].astype(np.int64) - 1
    roots = [Path(project_dir)] if project_dir else [path.parent, Path.cwd()]
    image_path = resolve_all(split[:, 2], roots)

    def col(df, name, default=np.nan):
        return df[name].to_numpy(dtype=np.float64) if df is not None and name in df else np.full(n, default, float)

    group = particles[_GROUP].to_numpy(dtype=np.int64) if _GROUP in particles else np.ones(n, np.int64)
    per_particle = particles.copy()
    if optics is not None:
        if _GROUP not in optics:
            raise CryoforumError("the optics table has no rlnOpticsGroup column.", path=path,
                                 fix="write the file with RELION 3.1 or newer.")
        missing = set(group) - set(optics[_GROUP].astype(int))
        if missing:
            r = int(np.argmax(np.isin(group, list(missing))))
            raise CryoforumError(f"optics group {sorted(missing)[0]} is not in the optics table.", path=path, row=r,
                                 fix="add the group to data_optics or correct rlnOpticsGroup.")
        og = optics.set_index(optics[_GROUP].astype(int))
        for column in og.columns:
            if column not in per_particle and column != _GROUP:
                per_particle[column] = og[column].reindex(group).to_numpy()

    detector, magnification = LEGACY_PIXEL_COLUMNS
    if _PIXEL in per_particle:
        pixel = col(per_particle, _PIXEL)
    elif detector in per_particle and magnification in per_particle:
        pixel = col(per_particle, detector) * 1e4 / col(per_particle, magnification)
    else:
        raise CryoforumError("no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification).",
                             path=path, fix="add the pixel size to the optics table.")
    if _BOX in per_particle:
        box = col(per_particle, _BOX).astype(np.int64)
    else:  # RELION 3.0: the box comes from the stack headers
        shapes = {p: stack_shape(p)[-1] for p in pd.unique(image_path) if os.path.exists(p)}
        box = np.array([shapes.get(p, -1) for p in image_path], dtype=np.int64)
        if (box < 0).any():
            r = int(np.argmax(box < 0))
            raise CryoforumError(f"image stack '{image_path[r]}' does not exist.", path=path, row=r,
                                 fix="check the image names, or pass --project-dir for relative paths.")
    check_box(box, path)

    if all(c in particles for c in ANGLE_COLUMNS):
        angles = particles[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64)
        check_quats(angles, path, "rlnAngleRot/Tilt/Psi")
        quat = quats_from_file(angles, "star")
    else:
        quat = np.full((n, 4), np.nan)
    if _ORIGIN[0] in particles:
        shift = np.stack([col(particles, c, 0.0) for c in _ORIGIN], 1)
    elif LEGACY_ORIGIN_COLUMNS[0] in particles:  # px
        shift = np.stack([col(particles, c, 0.0) for c in LEGACY_ORIGIN_COLUMNS], 1) * pixel[:, None]
    else:
        shift = np.zeros((n, 2))
    if not np.isfinite(shift).all():
        r = int(np.argmax(~np.isfinite(shift).all(axis=1)))
        raise CryoforumError("the origin (shift) contains NaN.", path=path, row=r, fix="remove the particle.")

    ctf = None
    if STAR_CTF["defocus_u"] in per_particle:
        ctf = {}
        for key, column in STAR_CTF.items():
            default = CTF_DEFAULTS.get(key, np.nan)
            ctf[key] = col(per_particle, column, default)
        if STAR_CTF["defocus_v"] not in per_particle:
            ctf["defocus_v"] = ctf["defocus_u"].copy()
    half = col(particles, _HALF, 0).astype(np.int64)
    uid = (particles[UID_COLUMN].to_numpy(dtype=np.uint64) if UID_COLUMN in particles
           else deterministic_uids(names))
    source = {"format": "star", "version": version, "particles": particles, "optics": optics,
              "particles_block": name, "image_names": names}
    return ParticleSet(image_path=image_path, image_index=index, quat=quat, shift_A=shift, pixel_size=pixel,
                       box=box, ctf=ctf, optics_group=group, half_set=half, uid=uid, source=source, path=path,
                       numeric=_numeric_columns(particles), file_format="star", star_version=version,
                       **typed_from_columns(particles, "star"))


def _optics_table(ps: ParticleSet) -> tuple[pd.DataFrame, np.ndarray]:
    """An optics table built from per-particle values and each particle's group number."""
    keys = [ps.optics_group, np.round(ps.pixel_size, 6), ps.box]
    if ps.ctf is not None:
        keys += [np.round(ps.ctf[k], 6) for k in _OPTICS_CTF]
    table = np.stack(keys, 1)
    uniq, inverse = np.unique(table, axis=0, return_inverse=True)
    groups = np.arange(1, len(uniq) + 1)
    rows = {"rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups], _GROUP: groups,
            _PIXEL: uniq[:, 1], _BOX: uniq[:, 2].astype(int), "rlnImageDimensionality": 2}
    if ps.ctf is not None:
        rows.update({STAR_CTF[k]: uniq[:, 3 + i] for i, k in enumerate(_OPTICS_CTF)})
    return pd.DataFrame(rows), groups[np.ravel(inverse)]


def _portable_names(names, image_path, image_index, relative_to) -> np.ndarray:
    """Image names from a STAR, kept verbatim where they still point at the same stack from the current
    (RELION project) directory or from ``relative_to``; otherwise rewritten relative to ``relative_to``."""
    stacks = np.char.partition(names.astype(str), "@")[:, 2]
    fixed = {}
    for stack, target in dict(zip(stacks, image_path)).items():
        bases = [Path.cwd()] + ([Path(relative_to)] if relative_to is not None else [])
        if Path(stack).is_absolute() or any(os.path.abspath(b / stack) == os.path.abspath(target) for b in bases):
            continue
        fixed[stack] = os.path.relpath(target, relative_to) if relative_to is not None else target
    if not fixed:
        return names
    return np.array([f"{i + 1:06d}@{fixed[s]}" if s in fixed else n
                     for n, s, i in zip(names, stacks, image_index)], dtype=object)


def star_tables(ps: ParticleSet, relative_to=None) -> dict[str, pd.DataFrame]:
    """RELION 3.1 ``{'optics': ..., 'particles': ...}`` tables for the set.

    A set read from a 3.1+ STAR keeps its optics table and every column; image names are kept verbatim where
    they still resolve from the RELION project directory (cwd) or ``relative_to``, else re-based on ``relative_to``.
    Otherwise names are written relative to ``relative_to`` (or absolute) and the optics table is built.
    Angles and origins are written from ``ps.quat`` / ``ps.shift_A`` (rows without a pose get no angles
    only if no row has one); the typed fields as their columns (a typed field that is None drops its column);
    ``ps.numeric`` columns with STAR names; then ``ps.extra`` columns other than the typed ones.
    """
    src = ps.source
    from_star = src.get("format") == "star"
    particles = src["particles"].copy() if from_star else pd.DataFrame(index=range(len(ps)))
    if from_star:
        names = _portable_names(np.asarray(src["image_names"], dtype=object), ps.image_path, ps.image_index,
                                relative_to)
    else:
        paths = ps.image_path if relative_to is None else [os.path.relpath(p, relative_to) for p in ps.image_path]
        names = np.array([f"{i + 1:06d}@{p}" for i, p in zip(ps.image_index, paths)], dtype=object)
    particles[_IMAGE_NAME] = names
    optics = src.get("optics") if from_star else None
    if optics is not None:
        optics = optics.copy()
        group = ps.optics_group
    else:
        optics, group = _optics_table(ps)
        for column in _OPTICS_COLUMNS:
            particles.pop(column) if column in particles else None
    particles[_GROUP] = group
    if ps.has_poses.any():
        angles = file_poses(ps.quat, "star")
        for i, column in enumerate(ANGLE_COLUMNS):
            particles[column] = angles[:, i]
    for i, column in enumerate(_ORIGIN):
        particles[column] = ps.shift_A[:, i]
    for column in LEGACY_ORIGIN_COLUMNS:
        particles.pop(column) if column in particles else None
    if ps.ctf is not None:
        for key, column in STAR_CTF.items():
            if key not in _OPTICS_CTF:
                particles[column] = ps.ctf[key]
    if (ps.half_set > 0).any():
        particles[_HALF] = ps.half_set
    particles[UID_COLUMN] = ps.uid.astype(np.uint64)  # uids survive moves and renames of the stacks
    typed = typed_columns(ps, "star")
    for column in TYPED_STAR_COLUMNS:
        if column in typed:
            particles[column] = np.asarray(typed[column])
        elif column in particles:
            particles.pop(column)
    for column, values in ps.numeric.items():
        if column.startswith("rln") and column not in CORE_STAR_COLUMNS and column not in typed:
            particles[column] = np.asarray(values)
    for column, values in ps.extra.items():
        if column not in TYPED_STAR_COLUMNS:
            particles[column] = np.asarray(values)
    return {"optics": optics, "particles": particles}


def write_star(ps: ParticleSet, path, relative_to=None, absolute_paths: bool = False) -> Path:
    """Write the set as a RELION 3.1 particle STAR file, atomically. See ``star_tables``; ``relative_to``
    defaults to the output file's directory; ``absolute_paths`` writes absolute stack paths instead."""
    if absolute_paths:
        tables = star_tables(ps, relative_to=None)
        tables["particles"][_IMAGE_NAME] = [f"{i + 1:06d}@{p}" for i, p in zip(ps.image_index, ps.image_path)]
    else:
        tables = star_tables(ps, relative_to=relative_to if relative_to is not None else Path(path).resolve().parent)
    with atomic_path(path) as tmp:
        starfile.write(tables, tmp, float_format="%.6f")
    return Path(path)
