"""One description of a particle set, shared by every adapter and the engine.

A ``ParticleSet`` holds, per particle (N rows): the image by reference (absolute stack path and 0-based
index), the pose as a quaternion (rotations.py convention, NaN rows where unknown), the shift in Å
(RELION's origin sign), CTF parameters, pixel size and box, optics group, half-set and uid; the typed
per-particle results of cryo-forum (uncertainty, figure of merit, junk label, the input's pose, the network's
pose) and every other numeric per-particle column (``numeric``), all filled by both readers; plus the original
table (``source``: STAR data blocks or cryoSPARC Dataset), read only by the I/O modules, so that every column the
user had goes back out. One half-set assignment serves every step: ``ParticleSet.with_half_sets``.

columns.py names every field in both formats (the column registry); the typed fields are converted to and from a
file's columns here (``typed_columns``, ``typed_from_columns``), for both readers and for ``extra``. The readers and
writers live in star.py (RELION STAR) and cs.py (cryoSPARC .cs), which import this module; files.py dispatches by
extension.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import stack_shape
from cryoforum_plugin.formats.columns import COLUMN, OWN_COLUMNS, TYPED_COLUMNS, TYPED_FIELDS

POSE_FIELDS = ("prior_quat", "predicted_quat")
"""Typed fields that are poses: (N, 4) quaternions, stored as three Euler angles or one rotation vector."""


def finite_rows(values: np.ndarray, convert, width: int = 3) -> np.ndarray:
    """(N, width) ``convert(values[rows])`` for the rows with no NaN, NaN for the others (quaternions to RELION
    angles or rotation vectors, width 3; and back, width 4)."""
    ok = np.isfinite(values).all(axis=1)
    out = np.full((len(values), width), np.nan)
    if ok.any():
        out[ok] = convert(values[ok])
    return out


def file_poses(quat: np.ndarray, fmt: str) -> np.ndarray:
    """(N, 3) poses as a file stores them, from (N, 4) quaternions: RELION (rot, tilt, psi) in degrees
    (``fmt`` 'star') or cryoSPARC rotation vectors in radians ('cs'); NaN rows where the pose is unknown."""
    return finite_rows(quat, rotations.quat_to_relion_euler if fmt == "star" else rotations.quat_to_cryosparc_pose)


def _euler_to_quat(angles: np.ndarray) -> np.ndarray:
    return rotations.relion_euler_to_quat(*angles.T)


def quats_from_file(poses: np.ndarray, fmt: str) -> np.ndarray:
    """(N, 4) quaternions from (N, 3) file poses (``file_poses``' inverse); NaN rows where a value is missing."""
    return finite_rows(poses, _euler_to_quat if fmt == "star" else rotations.cryosparc_pose_to_quat, width=4)


def field_value(ps, column):
    """The ParticleSet's value of a registry column (columns.Column): its attribute, or one key of a dict-valued
    attribute (None when the attribute is None)."""
    value = getattr(ps, column.attr)
    return value[column.key] if column.key and value is not None else value


_TYPED_BY_NAME = {name: c for c in TYPED_COLUMNS if len(c.star) == 1 for name in (c.star[0], c.cs_name)}
"""Names ``column()`` answers from a typed field before ``numeric``: STAR and .cs names of the scalar ones."""
_OWN_BY_NAME = {**{c.star[0]: c for c in OWN_COLUMNS if c.attr in ("ctf", "half_set", "optics_group", "pixel_size")},
                COLUMN["pixel_size"].cs_name: COLUMN["pixel_size"]}
"""Names ``column()`` answers from the own fields after ``numeric``: STAR names of the CTF, half-set, optics group
and pixel size, and blob/psize_A."""


@dataclasses.dataclass
class ParticleSet:
    """Particles by reference; every array has N rows. See the module docstring.

    Typed per-particle results (None when the file has none): ``uncertainty`` {'max', 'trace'} Bingham
    dispersions (<= 0), ``fom`` confidence in [0, 1], ``junk`` labels, ``prior_quat`` (N, 4) the input's pose
    (before prediction and refinement; the consensus poses a model is trained on), ``predicted_quat`` (N, 4) the
    network's prediction (NaN rows where unknown). With ``quat`` (the current pose: predicted, then refined) these
    are three distinguishable pose sets. ``image_sign`` (N,) the contrast sign of the stored images
    (columns.IMAGE_SIGN_CS; None: all +1, RELION's convention); ``read_images`` applies it. ``numeric``: every
    other numeric per-particle column, keyed by its STAR name (STAR input) or cryoSPARC field name (.cs input);
    ``column()`` looks any of them up by name. columns.COLUMNS names every field in both formats.
    ``extra``: STAR column name -> (N,) values added on output; names of typed fields given there set the
    typed field (the typed field is then what gets written).
    """

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
    source: dict = dataclasses.field(default_factory=dict)  # original tables, for star.py / cs.py only
    path: Path | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # STAR column name -> (N,) values added on output
    uncertainty: dict[str, np.ndarray] | None = None  # {'max', 'trace'} -> (N,) float64 dispersions
    fom: np.ndarray | None = None  # (N,) float64, rlnParticleFigureOfMerit / cryoforum/fom
    junk: np.ndarray | None = None  # (N,) int64, rlnCryoforumJunk / cryoforum/junk
    prior_quat: np.ndarray | None = None  # (N, 4) float64, rlnCryoforumPriorAngle* / cryoforum/prior_pose
    predicted_quat: np.ndarray | None = None  # (N, 4) float64, rlnCryoforumPredictedAngle* / cryoforum/predicted_pose
    image_sign: np.ndarray | None = None  # (N,) float64, +1 or -1 (IMAGE_SIGN_CS); None: all +1
    numeric: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # other numeric columns
    file_format: str | None = None  # 'star' or 'cs' when read from a file
    star_version: str | None = None  # '3.0' or '3.1' for a STAR file

    def __post_init__(self):
        typed = typed_from_columns(self.extra, "star")
        for name, value in typed.items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.image_path)

    @property
    def has_poses(self) -> np.ndarray:
        """(N,) bool: rows with a known pose."""
        return np.isfinite(self.quat).all(axis=1)

    def column(self, name: str) -> np.ndarray | None:
        """(N,) values of a per-particle column by its STAR name or cryoSPARC field name (typed fields, CTF,
        half-set and optics group included); None if the set has no such column."""
        column = _TYPED_BY_NAME.get(name)
        if column is not None:
            return field_value(self, column)
        if name in self.numeric:
            return self.numeric[name]
        column = _OWN_BY_NAME.get(name)
        return None if column is None else field_value(self, column)

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

        def take(a):
            return None if a is None else np.asarray(a)[rows]

        out = dataclasses.replace(
            self, image_path=self.image_path[rows], image_index=self.image_index[rows], quat=self.quat[rows],
            shift_A=self.shift_A[rows], pixel_size=self.pixel_size[rows], box=self.box[rows],
            ctf=None if self.ctf is None else {k: v[rows] for k, v in self.ctf.items()},
            optics_group=self.optics_group[rows], half_set=self.half_set[rows], uid=self.uid[rows], source=source,
            extra={k: np.asarray(v)[rows] for k, v in self.extra.items()},
            numeric={k: np.asarray(v)[rows] for k, v in self.numeric.items()})
        # the typed fields, not extra's copies of them, are the source of truth
        out.uncertainty = None if self.uncertainty is None else {k: v[rows] for k, v in self.uncertainty.items()}
        out.fom, out.junk, out.prior_quat = take(self.fom), take(self.junk), take(self.prior_quat)
        out.predicted_quat, out.image_sign = take(self.predicted_quat), take(self.image_sign)
        return out

    def with_half_sets(self, like: "ParticleSet | None" = None) -> "ParticleSet":
        """A copy in which every particle has a half-set (1 or 2): its own where the input gave one
        (rlnRandomSubset, alignments3D/split), else that of the particle with the same uid in ``like`` (e.g. the
        training set of a job) where that has one, else ``uid_half_sets``. Every step of a job (training map,
        reference half-maps, refinement, outputs) uses this one assignment (gold standard)."""
        half = np.asarray(self.half_set, np.int64).copy()
        free = ~np.isin(half, (1, 2))
        if like is not None and free.any():
            known = np.isin(like.half_set, (1, 2))
            uids, halves = np.asarray(like.uid, np.uint64)[known], np.asarray(like.half_set, np.int64)[known]
            order = np.argsort(uids, kind="stable")
            uids, halves = uids[order], halves[order]
            if len(uids):
                pos = np.clip(np.searchsorted(uids, self.uid[free]), 0, len(uids) - 1)
                hit = uids[pos] == self.uid[free]
                rows = np.nonzero(free)[0]
                half[rows[hit]] = halves[pos[hit]]
                free[rows[hit]] = False
        half[free] = uid_half_sets(self.uid[free])
        return dataclasses.replace(self, half_set=half)

    def read_images(self, reader, rows) -> np.ndarray:
        """(B, N, N) float32 images of ``rows`` (0-based indices) as the engine works on them: read with
        ``reader`` (images.StackReader) and multiplied by ``image_sign`` (light particles on a dark background;
        IMAGE_SIGN_CS). The one way training, prediction, refinement, reconstruction and the noise estimate read
        particle images."""
        rows = np.asarray(rows)
        images = reader.read(self.image_path[rows], self.image_index[rows])
        return apply_image_sign(images, None if self.image_sign is None else self.image_sign[rows])

    def require_one_sampling(self, step: str) -> tuple[float, int]:
        """(pixel size Å, box px) shared by every particle, for a ``step`` that works on one grid (reconstruction,
        the noise estimate, refinement, pre-training from a map). A set that mixes pixel sizes (beyond 0.1 %) or
        boxes, e.g. two optics groups, is one CryoforumError naming the file, the first row that differs and the
        fix; prediction resamples each optics group to the model instead (preprocess.to_model_grid)."""
        if len(self) == 0:
            raise CryoforumError(f"{step} needs particles; the set is empty.", path=self.path,
                                 fix="check the particle file and the selection.")
        apix, box = float(self.pixel_size[0]), int(self.box[0])
        other = (np.abs(self.pixel_size - apix) > 1e-3 * apix) | (self.box != box)
        if other.any():
            r = int(np.argmax(other))
            raise CryoforumError(
                f"{step} needs one pixel size and box, but this particle has {float(self.pixel_size[r]):g} Å/px and "
                f"{int(self.box[r])} px (optics group {int(self.optics_group[r])}) while the first has {apix:g} Å/px "
                f"and {box} px (optics group {int(self.optics_group[0])}).", path=self.path, row=r,
                fix="run this step on one optics group at a time (e.g. relion_star_handler --select rlnOpticsGroup "
                    "--minval G --maxval G), or re-extract all particles at one pixel size and box; `cryoforum "
                    "predict` takes several optics groups.")
        return apix, box

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


def _file_names(column, fmt: str) -> tuple[str, ...]:
    return column.star if fmt == "star" else (column.cs_name,)


def typed_from_columns(table, fmt: str) -> dict:
    """Typed ParticleSet fields (columns.TYPED_FIELDS) from a file's per-particle columns: ``table`` maps STAR
    column names (``fmt`` 'star': a dict or DataFrame) or .cs field names ('cs': {name: Dataset column}) to values.
    A field is filled when all its columns are there: poses as (N, 4) quaternions (NaN rows where an angle is
    missing), ``uncertainty`` {'max', 'trace'}, ``image_sign`` as ``image_signs``, the others in their dtype."""
    out = {}
    for field in TYPED_FIELDS:
        columns = [c for c in TYPED_COLUMNS if c.attr == field]
        if not all(name in table for c in columns for name in _file_names(c, fmt)):
            continue
        for column in columns:
            names = _file_names(column, fmt)
            if field in POSE_FIELDS:
                value = quats_from_file(np.column_stack([np.asarray(table[n], np.float64) for n in names]), fmt)
            elif field == "image_sign":
                value = image_signs(table[names[0]])
            else:
                value = np.asarray(table[names[0]]).astype(column.dtype, copy=False)
            if column.key:
                out.setdefault(field, {})[column.key] = value
            else:
                out[field] = value
    return out


def typed_columns(ps: ParticleSet, fmt: str) -> dict[str, np.ndarray]:
    """The typed fields that are set, as a file's columns (``typed_from_columns``' inverse): STAR column -> (N,)
    values in TYPED_STAR_COLUMNS order (``fmt`` 'star'), or .cs field -> values, poses (N, 3) ('cs')."""
    out = {}
    for column in TYPED_COLUMNS:
        value = field_value(ps, column)
        if value is None:
            continue
        names = _file_names(column, fmt)
        if column.attr in POSE_FIELDS:
            value = file_poses(value, fmt)
        out.update(zip(names, value.T) if len(names) > 1 else [(names[0], value)])
    return out


def image_signs(values) -> np.ndarray:
    """(N,) float64 contrast signs from stored values (blob/sign, rlnCryoforumImageSign): -1 where the value is
    negative, else +1 (0 or NaN, as in a Dataset allocated without it, say nothing and keep the image as it is)."""
    return np.where(np.asarray(values, dtype=np.float64) < 0, -1.0, 1.0)


def apply_image_sign(images: np.ndarray, sign) -> np.ndarray:
    """(B, N, N) ``images`` multiplied in place by their (B,) contrast ``sign`` (None, or all +1: unchanged)."""
    if sign is not None and (np.asarray(sign) < 0).any():
        images *= np.asarray(sign, dtype=images.dtype)[:, None, None]
    return images


def uid_half_sets(uid) -> np.ndarray:
    """(N,) int64 half-set, 1 or 2, of each particle from its uid alone: the top bit of the splitmix64 hash of the
    uid. Deterministic (the same particle gets the same half in any subset, any run, any machine) and balanced in
    expectation (each half holds 50 % ± 0.5/sqrt(N) of the particles, binomial), even for consecutive uids."""
    z = np.asarray(uid, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(63)).astype(np.int64) + 1


def half_sets(ps: ParticleSet) -> np.ndarray:
    """(N,) int64 half-set (1 or 2) of each particle of ``ps``: ``ps.with_half_sets().half_set``. What the
    reconstruction and the refinement use for particles the set gives none."""
    return ps.with_half_sets().half_set


def deterministic_uids(names) -> np.ndarray:
    """Stable 63-bit uids from image names, for particle files that have none."""
    out = np.empty(len(names), dtype=np.uint64)
    for i, name in enumerate(names):
        out[i] = int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=8).digest(), "little") >> 1
    return out


def check_quats(quat, path, what):
    """Raise on rows whose pose is partly NaN (all-NaN rows mean 'unknown')."""
    finite = np.isfinite(quat).all(axis=1)
    partial = ~finite & np.isfinite(quat).any(axis=1)
    if partial.any():
        r = int(np.argmax(partial))
        raise CryoforumError(f"the pose ({what}) contains NaN.", path=path, row=r,
                             fix="remove the particle or give it a complete pose.")


def check_box(box, path):
    """Raise on mixed box sizes."""
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


def resolve_all(paths, roots) -> np.ndarray:
    """Absolute stack paths: each relative path resolved against the first root that holds it (else the first)."""
    cache = {s: _resolve(s, roots) for s in pd.unique(np.asarray(paths, dtype=object))}
    return np.array([cache[s] for s in paths], dtype=object)
