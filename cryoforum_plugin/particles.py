"""One description of a particle set, shared by every adapter and the engine, and its STAR / .cs I/O.

A ``ParticleSet`` holds, per particle (N rows): the image by reference (absolute stack path and 0-based
index), the pose as a quaternion (geometry.py convention, NaN rows where unknown), the shift in Å
(RELION's origin sign), CTF parameters, pixel size and box, optics group, half-set and uid, plus the
original table (STAR data blocks or cryoSPARC Dataset) so that every column the user had goes back out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from . import geometry
from .atomic import atomic_path
from .errors import CryoforumError
from .images import stack_shape

CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "phase_shift")
"""CTF parameters: defocus U/V (Å), astigmatism angle (deg), voltage (kV), Cs (mm), amplitude contrast,
phase shift (deg)."""

_STAR_CTF = {"defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle",
             "voltage": "rlnVoltage", "cs": "rlnSphericalAberration", "amp_contrast": "rlnAmplitudeContrast",
             "phase_shift": "rlnPhaseShift"}
_OPTICS_CTF = ("voltage", "cs", "amp_contrast")
_CTF_DEFAULTS = {"defocus_angle": 0.0, "phase_shift": 0.0, "voltage": 300.0, "cs": 2.7, "amp_contrast": 0.1}
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
PRIOR_ANGLE_COLUMNS = ("rlnCryoforumPriorAngleRot", "rlnCryoforumPriorAngleTilt", "rlnCryoforumPriorAnglePsi")
UID_COLUMN = "rlnCryoforumUid"


@dataclasses.dataclass
class ParticleSet:
    """Particles by reference; every array has N rows. See the module docstring."""

    image_path: np.ndarray  # (N,) str, absolute stack paths
    image_index: np.ndarray  # (N,) int64, 0-based index in the stack
    quat: np.ndarray  # (N, 4) float64, NaN where the pose is unknown
    shift_A: np.ndarray  # (N, 2) float64, (x, y) origin in Å
    pixel_size: np.ndarray  # (N,) float64, Å
    box: np.ndarray  # (N,) int64, pixels
    ctf: dict[str, np.ndarray] | None  # CTF_FIELDS -> (N,) float64, or None without CTF
    optics_group: np.ndarray  # (N,) int64, 1-based
    half_set: np.ndarray  # (N,) int64, 1 or 2, 0 when unassigned
    uid: np.ndarray  # (N,) uint64
    source: dict = dataclasses.field(default_factory=dict)  # original tables: see read_star / read_cs
    path: Path | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # STAR column name -> (N,) values added on output

    def __len__(self) -> int:
        return len(self.image_path)

    @property
    def has_poses(self) -> np.ndarray:
        """(N,) bool: rows with a known pose."""
        return np.isfinite(self.quat).all(axis=1)

    def subset(self, rows) -> "ParticleSet":
        """Rows selected by a boolean mask or an index array, with the original table rows kept."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.nonzero(rows)[0]
        source = dict(self.source)
        if "particles" in source:
            source["particles"] = source["particles"].iloc[rows].reset_index(drop=True)
        if "image_names" in source:
            source["image_names"] = np.asarray(source["image_names"])[rows]
        if "dataset" in source:
            source["dataset"] = source["dataset"].take(rows)
        return dataclasses.replace(
            self, image_path=self.image_path[rows], image_index=self.image_index[rows], quat=self.quat[rows],
            shift_A=self.shift_A[rows], pixel_size=self.pixel_size[rows], box=self.box[rows],
            ctf=None if self.ctf is None else {k: v[rows] for k, v in self.ctf.items()},
            optics_group=self.optics_group[rows], half_set=self.half_set[rows], uid=self.uid[rows], source=source,
            extra={k: np.asarray(v)[rows] for k, v in self.extra.items()})

    def validate_images(self) -> None:
        """Check that every stack exists and every index lies inside its stack (headers only)."""
        paths = self.image_path
        for path in np.unique(paths):
            rows = np.nonzero(paths == path)[0]
            if not os.path.exists(path):
                raise CryoforumError(f"image stack '{path}' does not exist.", path=self.path, row=int(rows[0]),
                                     fix="check the image names, or pass --project-dir for relative paths.")
            n, ny, nx = stack_shape(path)
            idx = self.image_index[rows]
            bad = np.nonzero((idx < 0) | (idx >= n))[0]
            if len(bad):
                r = int(rows[bad[0]])
                raise CryoforumError(f"image {int(self.image_index[r]) + 1} requested from '{path}', which holds "
                                     f"{n} images.", path=self.path, row=r,
                                     fix="the particle file does not match its stacks; re-extract or fix the names.")
            if ny != nx or np.any(self.box[rows] != nx):
                raise CryoforumError(f"stack '{path}' has {ny}x{nx} images but the particle file says "
                                     f"{int(self.box[rows[0]])} px.", path=self.path, row=int(rows[0]),
                                     fix="set rlnImageSize / blob/shape to the real box size.")


def deterministic_uids(names) -> np.ndarray:
    """Stable 63-bit uids from image names, for particle files that have none."""
    out = np.empty(len(names), dtype=np.uint64)
    for i, name in enumerate(names):
        out[i] = int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=8).digest(), "little") >> 1
    return out


def _check_quats(quat, path, what):
    finite = np.isfinite(quat).all(axis=1)
    partial = ~finite & np.isfinite(quat).any(axis=1)
    if partial.any():
        r = int(np.argmax(partial))
        raise CryoforumError(f"the pose ({what}) contains NaN.", path=path, row=r,
                             fix="remove the particle or give it a complete pose.")


def _check_box(box, path):
    if len(np.unique(box)) > 1:
        first, other = int(box[0]), int(np.argmax(box != box[0]))
        raise CryoforumError(f"mixed box sizes ({first} px and {int(box[other])} px) in one particle set.",
                             path=path, row=other,
                             fix="split the set by box size or re-extract all particles with one box.")


def _resolve(rel: str, roots: list[Path]) -> str:
    p = Path(rel)
    if p.is_absolute():
        return str(p)
    for root in roots:
        if (root / p).exists():
            return str((root / p).resolve())
    return str((roots[0] / p).resolve())


def _resolve_all(paths, roots) -> np.ndarray:
    cache = {s: _resolve(s, roots) for s in pd.unique(np.asarray(paths, dtype=object))}
    return np.array([cache[s] for s in paths], dtype=object)


# ------------------------------------------------------------------------------------------ STAR


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
        tables = [(k, v) for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v]
        if not tables:
            raise CryoforumError("no particle table with rlnImageName.", path=path,
                                 fix="pass a particle STAR file (e.g. run_data.star or particles.star), "
                                     "not an optimiser, model or micrograph file.")
        name, particles = tables[0]
    else:
        name = "particles"
    if not isinstance(particles, pd.DataFrame) or "rlnImageName" not in particles:
        raise CryoforumError("the particle table has no rlnImageName column.", path=path,
                             fix="the STAR file must list particle images (index@stack.mrcs).")
    particles = particles.reset_index(drop=True)
    n = len(particles)
    if optics is not None and not isinstance(optics, pd.DataFrame):
        optics = None
    version = "3.1" if optics is not None else "3.0"

    names = particles["rlnImageName"].astype(str).to_numpy()
    split = np.char.partition(names.astype(str), "@")
    bad = np.nonzero((split[:, 1] != "@") | ~np.char.isdigit(split[:, 0]))[0]
    if len(bad):
        raise CryoforumError(f"image name '{names[bad[0]]}' is not of the form index@stack.",
                             path=path, row=int(bad[0]), fix="use RELION image names like 000001@Extract/stack.mrcs.")
    index = split[:, 0].astype(np.int64) - 1
    roots = [Path(project_dir)] if project_dir else [path.parent, Path.cwd()]
    image_path = _resolve_all(split[:, 2], roots)

    def col(df, name, default=np.nan):
        return df[name].to_numpy(dtype=np.float64) if df is not None and name in df else np.full(n, default, float)

    group = particles["rlnOpticsGroup"].to_numpy(dtype=np.int64) if "rlnOpticsGroup" in particles else np.ones(n, np.int64)
    per_particle = particles.copy()
    if optics is not None:
        if "rlnOpticsGroup" not in optics:
            raise CryoforumError("the optics table has no rlnOpticsGroup column.", path=path,
                                 fix="write the file with RELION 3.1 or newer.")
        missing = set(group) - set(optics["rlnOpticsGroup"].astype(int))
        if missing:
            r = int(np.argmax(np.isin(group, list(missing))))
            raise CryoforumError(f"optics group {sorted(missing)[0]} is not in the optics table.", path=path, row=r,
                                 fix="add the group to data_optics or correct rlnOpticsGroup.")
        og = optics.set_index(optics["rlnOpticsGroup"].astype(int))
        for column in og.columns:
            if column not in per_particle and column != "rlnOpticsGroup":
                per_particle[column] = og[column].reindex(group).to_numpy()

    if "rlnImagePixelSize" in per_particle:
        pixel = col(per_particle, "rlnImagePixelSize")
    elif "rlnDetectorPixelSize" in per_particle and "rlnMagnification" in per_particle:
        pixel = col(per_particle, "rlnDetectorPixelSize") * 1e4 / col(per_particle, "rlnMagnification")
    else:
        raise CryoforumError("no pixel size (rlnImagePixelSize, or rlnDetectorPixelSize and rlnMagnification).",
                             path=path, fix="add the pixel size to the optics table.")
    if "rlnImageSize" in per_particle:
        box = col(per_particle, "rlnImageSize").astype(np.int64)
    else:  # RELION 3.0: the box comes from the stack headers
        shapes = {p: stack_shape(p)[-1] for p in pd.unique(image_path) if os.path.exists(p)}
        box = np.array([shapes.get(p, -1) for p in image_path], dtype=np.int64)
        if (box < 0).any():
            r = int(np.argmax(box < 0))
            raise CryoforumError(f"image stack '{image_path[r]}' does not exist.", path=path, row=r,
                                 fix="check the image names, or pass --project-dir for relative paths.")
    _check_box(box, path)

    if all(c in particles for c in ANGLE_COLUMNS):
        angles = particles[list(ANGLE_COLUMNS)].to_numpy(dtype=np.float64)
        _check_quats(angles, path, "rlnAngleRot/Tilt/Psi")
        quat = np.full((n, 4), np.nan)
        ok = np.isfinite(angles).all(axis=1)
        quat[ok] = geometry.relion_euler_to_quat(*angles[ok].T)
    else:
        quat = np.full((n, 4), np.nan)
    if "rlnOriginXAngst" in particles:
        shift = np.stack([col(particles, "rlnOriginXAngst", 0.0), col(particles, "rlnOriginYAngst", 0.0)], 1)
    elif "rlnOriginX" in particles:
        shift = np.stack([col(particles, "rlnOriginX", 0.0), col(particles, "rlnOriginY", 0.0)], 1) * pixel[:, None]
    else:
        shift = np.zeros((n, 2))
    if not np.isfinite(shift).all():
        r = int(np.argmax(~np.isfinite(shift).all(axis=1)))
        raise CryoforumError("the origin (shift) contains NaN.", path=path, row=r, fix="remove the particle.")

    ctf = None
    if "rlnDefocusU" in per_particle:
        ctf = {}
        for key, column in _STAR_CTF.items():
            default = _CTF_DEFAULTS.get(key, np.nan)
            ctf[key] = col(per_particle, column, default)
        if "rlnDefocusV" not in per_particle:
            ctf["defocus_v"] = ctf["defocus_u"].copy()
    half = col(particles, "rlnRandomSubset", 0).astype(np.int64)
    uid = (particles[UID_COLUMN].to_numpy(dtype=np.uint64) if UID_COLUMN in particles
           else deterministic_uids(names))
    source = {"format": "star", "version": version, "particles": particles, "optics": optics,
              "particles_block": name, "image_names": names}
    return ParticleSet(image_path=image_path, image_index=index, quat=quat, shift_A=shift, pixel_size=pixel,
                       box=box, ctf=ctf, optics_group=group, half_set=half, uid=uid, source=source, path=path)


def _optics_table(ps: ParticleSet) -> tuple[pd.DataFrame, np.ndarray]:
    """An optics table built from per-particle values and each particle's group number."""
    keys = [ps.optics_group, np.round(ps.pixel_size, 6), ps.box]
    if ps.ctf is not None:
        keys += [np.round(ps.ctf[k], 6) for k in _OPTICS_CTF]
    table = np.stack(keys, 1)
    uniq, inverse = np.unique(table, axis=0, return_inverse=True)
    groups = np.arange(1, len(uniq) + 1)
    rows = {"rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups], "rlnOpticsGroup": groups,
            "rlnImagePixelSize": uniq[:, 1], "rlnImageSize": uniq[:, 2].astype(int), "rlnImageDimensionality": 2}
    if ps.ctf is not None:
        rows.update({"rlnVoltage": uniq[:, 3], "rlnSphericalAberration": uniq[:, 4],
                     "rlnAmplitudeContrast": uniq[:, 5]})
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
    only if no row has one).
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
    particles["rlnImageName"] = names
    optics = src.get("optics") if from_star else None
    if optics is not None:
        optics = optics.copy()
        group = ps.optics_group
    else:
        optics, group = _optics_table(ps)
        for column in ("rlnImagePixelSize", "rlnImageSize", "rlnDetectorPixelSize", "rlnMagnification",
                       "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
            particles.pop(column) if column in particles else None
    particles["rlnOpticsGroup"] = group
    if ps.has_poses.any():
        angles = np.full((len(ps), 3), np.nan)
        angles[ps.has_poses] = geometry.quat_to_relion_euler(ps.quat[ps.has_poses])
        for i, column in enumerate(ANGLE_COLUMNS):
            particles[column] = angles[:, i]
    particles["rlnOriginXAngst"] = ps.shift_A[:, 0]
    particles["rlnOriginYAngst"] = ps.shift_A[:, 1]
    for column in ("rlnOriginX", "rlnOriginY"):
        particles.pop(column) if column in particles else None
    if ps.ctf is not None:
        for key in ("defocus_u", "defocus_v", "defocus_angle", "phase_shift"):
            particles[_STAR_CTF[key]] = ps.ctf[key]
    if (ps.half_set > 0).any():
        particles["rlnRandomSubset"] = ps.half_set
    particles[UID_COLUMN] = ps.uid.astype(np.uint64)  # uids survive moves and renames of the stacks
    for column, values in ps.extra.items():
        particles[column] = np.asarray(values)
    return {"optics": optics, "particles": particles}


def write_star(ps: ParticleSet, path, relative_to=None, absolute_paths: bool = False) -> Path:
    """Write the set as a RELION 3.1 particle STAR file, atomically. See ``star_tables``; ``relative_to``
    defaults to the output file's directory; ``absolute_paths`` writes absolute stack paths instead."""
    if absolute_paths:
        tables = star_tables(ps, relative_to=None)
        tables["particles"]["rlnImageName"] = [f"{i + 1:06d}@{p}" for i, p in zip(ps.image_index, ps.image_path)]
    else:
        tables = star_tables(ps, relative_to=relative_to if relative_to is not None else Path(path).resolve().parent)
    with atomic_path(path) as tmp:
        starfile.write(tables, tmp, float_format="%.6f")
    return Path(path)


# ------------------------------------------------------------------------------------------ .cs


def _load_dataset(path):
    from cryosparc.dataset import Dataset

    path = Path(path)
    if not path.exists():
        raise CryoforumError("particle file not found.", path=path, fix="check the path.")
    try:
        return Dataset.load(str(path))
    except Exception as exc:
        raise CryoforumError(f"cannot read as a cryoSPARC .cs file ({exc}).", path=path,
                             fix="pass a particles .cs file exported by cryoSPARC.") from None


def read_cs(path, project_dir=None) -> ParticleSet:
    """Read a cryoSPARC particle ``.cs`` file (blob slot required; ctf and alignments3D when present).

    ``blob/path`` (a leading '>' of exported jobs stripped) is resolved against ``project_dir`` if given,
    else the directory of the .cs file, its parent or grandparent (the cryoSPARC project directory), or cwd.
    """
    return from_dataset(_load_dataset(path), path=Path(path), project_dir=project_dir)


def from_dataset(ds, path=None, project_dir=None) -> ParticleSet:
    """A ``ParticleSet`` from an in-memory cryoSPARC ``Dataset`` (as ``read_cs``)."""
    fields = set(ds.fields())
    for need in ("blob/path", "blob/idx", "blob/shape", "blob/psize_A"):
        if need not in fields:
            raise CryoforumError(f"the .cs file has no '{need}' field (no particle images).", path=path,
                                 fix="export the particles with their blob slot (e.g. from an Extract or Refine "
                                     "job's 'particles' output, not only alignments).")
    n = len(ds)
    raw = np.array([p.decode() if isinstance(p, bytes) else str(p) for p in ds["blob/path"]], dtype=object)
    raw = np.array([p[1:] if p.startswith(">") else p for p in raw], dtype=object)
    if project_dir:
        roots = [Path(project_dir)]
    else:
        base = Path(path).resolve().parent if path else Path.cwd()
        roots = [base, base.parent, base.parent.parent, Path.cwd()]
    image_path = _resolve_all(raw, roots)
    box = np.asarray(ds["blob/shape"])[:, -1].astype(np.int64)
    _check_box(box, path)
    pixel = np.asarray(ds["blob/psize_A"], dtype=np.float64)
    quat = np.full((n, 4), np.nan)
    shift = np.zeros((n, 2))
    half = np.zeros(n, np.int64)
    if "alignments3D/pose" in fields:
        pose = np.asarray(ds["alignments3D/pose"], dtype=np.float64)
        _check_quats(pose, path, "alignments3D/pose")
        ok = np.isfinite(pose).all(axis=1)
        quat[ok] = geometry.cryosparc_pose_to_quat(pose[ok])
        if "alignments3D/shift" in fields:
            apix = (np.asarray(ds["alignments3D/psize_A"], dtype=np.float64)
                    if "alignments3D/psize_A" in fields else pixel)
            apix = np.where(apix > 0, apix, pixel)
            shift = np.asarray(ds["alignments3D/shift"], dtype=np.float64) * apix[:, None]
            if not np.isfinite(shift).all():
                r = int(np.argmax(~np.isfinite(shift).all(axis=1)))
                raise CryoforumError("alignments3D/shift contains NaN.", path=path, row=r, fix="remove the particle.")
        if "alignments3D/split" in fields:
            half = np.asarray(ds["alignments3D/split"], dtype=np.int64) + 1
    ctf = None
    if "ctf/df1_A" in fields:
        def get(name, default):
            return np.asarray(ds[name], dtype=np.float64) if name in fields else np.full(n, default, float)

        ctf = {"defocus_u": get("ctf/df1_A", np.nan), "defocus_v": get("ctf/df2_A", np.nan),
               "defocus_angle": np.rad2deg(get("ctf/df_angle_rad", 0.0)), "voltage": get("ctf/accel_kv", 300.0),
               "cs": get("ctf/cs_mm", 2.7), "amp_contrast": get("ctf/amp_contrast", 0.1),
               "phase_shift": np.rad2deg(get("ctf/phase_shift_rad", 0.0))}
    group = (np.asarray(ds["ctf/exp_group_id"], dtype=np.int64) + 1 if "ctf/exp_group_id" in fields
             else np.ones(n, np.int64))
    return ParticleSet(image_path=image_path, image_index=np.asarray(ds["blob/idx"], dtype=np.int64), quat=quat,
                       shift_A=shift, pixel_size=pixel, box=box, ctf=ctf, optics_group=group, half_set=half,
                       uid=np.asarray(ds["uid"], dtype=np.uint64),
                       source={"format": "cs", "dataset": ds, "project_dir": roots[0]}, path=path)


CS_BLOB_FIELDS = [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)), ("blob/psize_A", "f4"),
                  ("blob/sign", "f4"), ("blob/import_sig", "u8")]
CS_CTF_FIELDS = [("ctf/type", "O"), ("ctf/exp_group_id", "u4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
                 ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"), ("ctf/df_angle_rad", "f4"),
                 ("ctf/phase_shift_rad", "f4"), ("ctf/scale", "f4"), ("ctf/scale_const", "f4"),
                 ("ctf/shift_A", "f4", (2,)), ("ctf/tilt_A", "f4", (2,)), ("ctf/trefoil_A", "f4", (2,)),
                 ("ctf/tetra_A", "f4", (4,)), ("ctf/anisomag", "f4", (4,)), ("ctf/bfactor", "f4")]
CS_ALIGN_FIELDS = [("alignments3D/split", "u4"), ("alignments3D/shift", "f4", (2,)), ("alignments3D/pose", "f4", (3,)),
                   ("alignments3D/psize_A", "f4"), ("alignments3D/error", "f4"), ("alignments3D/class_posterior", "f4"),
                   ("alignments3D/class", "u4")]


def _portable_blob_paths(raw, image_path, out_dir, project_dir) -> np.ndarray:
    """``blob/path`` values kept verbatim where a reader of the output (.cs in ``out_dir``) still finds the same
    stack from the project directory, the output directory or its parents; else relative to ``project_dir``
    (when the stack is inside it) or absolute."""
    raw = np.array([p.decode() if isinstance(p, bytes) else str(p) for p in raw], dtype=object)
    roots = [Path(project_dir)] if project_dir else []
    if out_dir is not None:
        roots += [Path(out_dir), Path(out_dir).parent, Path(out_dir).parent.parent]
    roots.append(Path.cwd())
    out = raw.copy()
    for value, target in dict(zip(raw, image_path)).items():
        rel = value[1:] if value.startswith(">") else value
        if Path(rel).is_absolute() or any(os.path.abspath(r / rel) == os.path.abspath(target) for r in roots):
            continue
        if project_dir and Path(target).resolve().is_relative_to(Path(project_dir).resolve()):
            new = os.path.relpath(Path(target).resolve(), Path(project_dir).resolve())
        else:
            new = str(target)
        out[raw == value] = new
    return out


def to_dataset(ps: ParticleSet, project_dir=None, out_dir=None):
    """A cryoSPARC ``Dataset`` for the set: the original Dataset's fields kept (same uids), poses, shifts,
    CTF and half-sets written in cryoSPARC's convention (rotation vector, shift in pixels). ``out_dir``: where
    the .cs will live (blob paths that would no longer resolve from there are re-based)."""
    from cryosparc.dataset import Dataset

    src = ps.source
    if src.get("format") == "cs":
        ds = src["dataset"].copy()
        ds["blob/path"] = _portable_blob_paths(ds["blob/path"], ps.image_path, out_dir, project_dir)
    else:
        ds = Dataset.allocate(len(ps), CS_BLOB_FIELDS + (CS_CTF_FIELDS if ps.ctf is not None else []))
        ds["uid"] = ps.uid
        root = Path(project_dir).resolve() if project_dir else None
        paths = []
        for p in ps.image_path:
            if root is not None and Path(p).is_relative_to(root):
                p = os.path.relpath(p, root)
            paths.append(p)
        ds["blob/path"] = np.array(paths, dtype=object)
        ds["blob/idx"] = ps.image_index
        ds["blob/shape"] = np.stack([ps.box, ps.box], 1)
        ds["blob/psize_A"] = ps.pixel_size
        ds["blob/sign"] = -1.0
        if ps.ctf is not None:
            ds["ctf/type"] = np.array(["spline"] * len(ps), dtype=object)
            ds["ctf/exp_group_id"] = ps.optics_group - 1
            ds["ctf/scale"] = 1.0
            ds["ctf/scale_const"] = 0.0
    if ps.ctf is not None:
        missing = [f for f in CS_CTF_FIELDS if f[0] not in ds.fields()]
        if missing:
            ds.add_fields(missing)
        ds["ctf/df1_A"] = ps.ctf["defocus_u"]
        ds["ctf/df2_A"] = ps.ctf["defocus_v"]
        ds["ctf/df_angle_rad"] = np.deg2rad(ps.ctf["defocus_angle"])
        ds["ctf/phase_shift_rad"] = np.deg2rad(ps.ctf["phase_shift"])
        ds["ctf/accel_kv"] = ps.ctf["voltage"]
        ds["ctf/cs_mm"] = ps.ctf["cs"]
        ds["ctf/amp_contrast"] = ps.ctf["amp_contrast"]
    if ps.has_poses.any() or (ps.shift_A != 0).any():
        missing = [f for f in CS_ALIGN_FIELDS if f[0] not in ds.fields()]
        if missing:
            ds.add_fields(missing)
        pose = np.zeros((len(ps), 3))
        pose[ps.has_poses] = geometry.quat_to_cryosparc_pose(ps.quat[ps.has_poses])
        ds["alignments3D/pose"] = pose
        ds["alignments3D/shift"] = ps.shift_A / ps.pixel_size[:, None]
        ds["alignments3D/psize_A"] = ps.pixel_size
        if (ps.half_set > 0).any():
            ds["alignments3D/split"] = np.clip(ps.half_set - 1, 0, 1)
    return ds


def write_cs(ps: ParticleSet, path, project_dir=None) -> Path:
    """Write the set as a cryoSPARC ``.cs`` file, atomically. See ``to_dataset``."""
    ds = to_dataset(ps, project_dir=project_dir, out_dir=Path(path).resolve().parent)
    with atomic_path(path) as tmp:
        ds.save(str(tmp))
    return Path(path)


# ------------------------------------------------------------------------------------------ dispatch


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
