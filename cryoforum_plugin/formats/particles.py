"""One description of a particle set, shared by every adapter and the engine; dispatch of its I/O by extension.

A ``ParticleSet`` holds, per particle (N rows): the image by reference (absolute stack path and 0-based
index), the pose as a quaternion (geometry.py convention, NaN rows where unknown), the shift in Å
(RELION's origin sign), CTF parameters, pixel size and box, optics group, half-set and uid; the typed
per-particle results of cryo-forum (uncertainty, figure of merit, junk label, the input's pose, the network's
pose) and every other numeric per-particle column (``numeric``), all filled by both readers; plus the original
table (``source``: STAR data blocks or cryoSPARC Dataset), read only by the I/O modules, so that every column the
user had goes back out. One half-set assignment serves every step: ``ParticleSet.with_half_sets``.

The readers and writers live in ``star_io.py`` (RELION STAR) and ``cs_io.py`` (cryoSPARC .cs); their public
names are re-exported here (``read_star``, ``write_star``, ``read_cs``, ``write_cs``, ``from_dataset``,
``to_dataset``, ``CS_*_FIELDS``, ...), imported lazily so that the I/O modules can import this one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryoforum_plugin.physics import rotations as geometry
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import stack_shape
from cryoforum_plugin.formats.columns import FOM_COLUMN, STAR_COLUMNS

CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast", "phase_shift")
"""CTF parameters: defocus U/V (Å), astigmatism angle (deg), voltage (kV), Cs (mm), amplitude contrast,
phase shift (deg)."""

STAR_CTF = {"defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle",
            "voltage": "rlnVoltage", "cs": "rlnSphericalAberration", "amp_contrast": "rlnAmplitudeContrast",
            "phase_shift": "rlnPhaseShift"}
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
PRIOR_ANGLE_COLUMNS = ("rlnCryoforumPriorAngleRot", "rlnCryoforumPriorAngleTilt", "rlnCryoforumPriorAnglePsi")
"""The input's poses (e.g. the consensus refinement's), as the set had them before cryo-forum predicted or refined."""
PREDICTED_ANGLE_COLUMNS = ("rlnCryoforumPredictedAngleRot", "rlnCryoforumPredictedAngleTilt",
                           "rlnCryoforumPredictedAnglePsi")
"""The network's predicted poses (kept when the refinement or a later RELION job replaces rlnAngle*)."""
UID_COLUMN = "rlnCryoforumUid"
JUNK_COLUMN = "rlnCryoforumJunk"
"""Per-particle junk label of simulated truth files: 0 = a real particle, else simulation.JUNK_KINDS."""
IMAGE_SIGN_STAR = "rlnCryoforumImageSign"
IMAGE_SIGN_CS = "blob/sign"
"""Per-particle contrast sign of the stored image (cryoSPARC's ``blob/sign``; RELION has no such column, so STAR
files carry it as rlnCryoforumImageSign). +1: light particles on a dark background, the contrast of a
positive-density map (image = +CTF * projection with ctf.py's RELION CTF): what RELION's Extract job writes (its
"Invert contrast?" defaults to Yes) and what the engine works on. -1: the micrograph's own contrast, dark particles,
as cryoSPARC's Extract job stores them (its particles carry blob/sign = -1). The engine reads ``sign x stored
image`` (``ParticleSet.read_images``); docs/cryosparc.md has the sources."""

# Typed per-particle fields and their names: STAR column(s) and cryoSPARC .cs field.
UNCERTAINTY_STAR = dict(STAR_COLUMNS)  # {'max': rlnCryoforumMaxDispersion, 'trace': rlnCryoforumTraceDispersion}
UNCERTAINTY_CS = {"max": "cryoforum/max_dispersion", "trace": "cryoforum/trace_dispersion"}
FOM_CS = "cryoforum/fom"
JUNK_CS = "cryoforum/junk"
PRIOR_POSE_CS = "cryoforum/prior_pose"
PREDICTED_POSE_CS = "cryoforum/predicted_pose"
REFINE_STAR = {"score": "rlnCryoforumRefineScore", "confidence": "rlnCryoforumRefineConfidence"}
REFINE_CS = {"score": "cryoforum/refine_score", "confidence": "cryoforum/refine_confidence"}
"""Per-particle results of the refinement (held in ``numeric`` under both names; each writer takes its own)."""
TYPED_STAR_COLUMNS = (*PRIOR_ANGLE_COLUMNS, *PREDICTED_ANGLE_COLUMNS, UNCERTAINTY_STAR["max"],
                      UNCERTAINTY_STAR["trace"], FOM_COLUMN, JUNK_COLUMN, IMAGE_SIGN_STAR)
"""STAR columns held by typed fields (never in ``numeric``), in the order writers append them."""
CORE_STAR_COLUMNS = frozenset({"rlnImageName", *ANGLE_COLUMNS, "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
                               "rlnOriginYAngst", *STAR_CTF.values(), "rlnOpticsGroup", "rlnRandomSubset",
                               UID_COLUMN, "rlnImagePixelSize", "rlnImageSize", "rlnDetectorPixelSize",
                               "rlnMagnification"})
"""STAR columns the writers derive from the ParticleSet's own fields (never in ``numeric``)."""


def finite_rows(quat: np.ndarray, convert) -> np.ndarray:
    """(N, 3) ``convert(quat[rows])`` for the rows with a complete pose, NaN for the others (RELION angles
    or rotation vectors)."""
    ok = np.isfinite(quat).all(axis=1)
    out = np.full((len(quat), 3), np.nan)
    if ok.any():
        out[ok] = convert(quat[ok])
    return out


@dataclasses.dataclass
class ParticleSet:
    """Particles by reference; every array has N rows. See the module docstring.

    Typed per-particle results (None when the file has none): ``uncertainty`` {'max', 'trace'} Bingham
    dispersions (<= 0), ``fom`` confidence in [0, 1], ``junk`` labels, ``prior_quat`` (N, 4) the input's pose
    (before prediction and refinement; the consensus poses a model is trained on), ``predicted_quat`` (N, 4) the
    network's prediction (NaN rows where unknown). With ``quat`` (the current pose: predicted, then refined) these
    are three distinguishable pose sets. ``image_sign`` (N,) the contrast sign of the stored images
    (IMAGE_SIGN_CS; None: all +1, RELION's convention); ``read_images`` applies it. ``numeric``: every other numeric per-particle column, keyed by its
    STAR name (STAR input) or cryoSPARC field name (.cs input); ``column()`` looks any of them up by name.
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
    source: dict = dataclasses.field(default_factory=dict)  # original tables, for star_io / cs_io only
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
        typed = typed_from_star_columns(self.extra)
        for name, value in typed.items():
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(self.image_path)

    @property
    def has_poses(self) -> np.ndarray:
        """(N,) bool: rows with a known pose."""
        return np.isfinite(self.quat).all(axis=1)

    def typed_star_columns(self) -> dict[str, np.ndarray]:
        """The typed fields as STAR columns (in TYPED_STAR_COLUMNS order), only those that are set."""
        out = {}
        for quat, columns in ((self.prior_quat, PRIOR_ANGLE_COLUMNS), (self.predicted_quat, PREDICTED_ANGLE_COLUMNS)):
            if quat is not None:
                angles = finite_rows(quat, geometry.quat_to_relion_euler)
                out.update({c: angles[:, i] for i, c in enumerate(columns)})
        if self.uncertainty is not None:
            out.update({UNCERTAINTY_STAR[k]: self.uncertainty[k] for k in ("max", "trace")})
        if self.fom is not None:
            out[FOM_COLUMN] = self.fom
        if self.junk is not None:
            out[JUNK_COLUMN] = self.junk
        if self.image_sign is not None:
            out[IMAGE_SIGN_STAR] = self.image_sign
        return out

    def column(self, name: str) -> np.ndarray | None:
        """(N,) values of a per-particle column by its STAR name or cryoSPARC field name (typed fields, CTF,
        half-set and optics group included); None if the set has no such column."""
        if name in (FOM_COLUMN, FOM_CS):
            return self.fom
        if name in (JUNK_COLUMN, JUNK_CS):
            return self.junk
        if name in (IMAGE_SIGN_STAR, IMAGE_SIGN_CS):
            return self.image_sign
        for key in ("max", "trace"):
            if name in (UNCERTAINTY_STAR[key], UNCERTAINTY_CS[key]):
                return None if self.uncertainty is None else self.uncertainty[key]
        if name in self.numeric:
            return self.numeric[name]
        ctf_key = {v: k for k, v in STAR_CTF.items()}.get(name)
        if ctf_key is not None:
            return None if self.ctf is None else self.ctf[ctf_key]
        core = {"rlnRandomSubset": self.half_set, "rlnOpticsGroup": self.optics_group,
                "rlnImagePixelSize": self.pixel_size, "blob/psize_A": self.pixel_size}
        return core.get(name)

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


def typed_from_star_columns(columns) -> dict:
    """Typed ParticleSet fields from STAR columns (a dict or DataFrame): ``prior_quat`` and ``predicted_quat``
    (all three angle columns needed; NaN rows where an angle is missing), ``uncertainty`` (both dispersions),
    ``fom``, ``junk``."""
    out = {}
    for name, names in (("prior_quat", PRIOR_ANGLE_COLUMNS), ("predicted_quat", PREDICTED_ANGLE_COLUMNS)):
        if all(c in columns for c in names):
            angles = np.stack([np.asarray(columns[c], dtype=np.float64) for c in names], 1)
            quat = np.full((len(angles), 4), np.nan)
            ok = np.isfinite(angles).all(axis=1)
            if ok.any():
                quat[ok] = geometry.relion_euler_to_quat(*angles[ok].T)
            out[name] = quat
    if all(UNCERTAINTY_STAR[k] in columns for k in ("max", "trace")):
        out["uncertainty"] = {k: np.asarray(columns[UNCERTAINTY_STAR[k]], dtype=np.float64) for k in ("max", "trace")}
    if FOM_COLUMN in columns:
        out["fom"] = np.asarray(columns[FOM_COLUMN], dtype=np.float64)
    if JUNK_COLUMN in columns:
        out["junk"] = np.asarray(columns[JUNK_COLUMN]).astype(np.int64)
    if IMAGE_SIGN_STAR in columns:
        out["image_sign"] = image_signs(columns[IMAGE_SIGN_STAR])
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


# ------------------------------------------------------------------------------------------ dispatch


def read_particles(path, project_dir=None) -> ParticleSet:
    """Read a ``.star`` or ``.cs`` particle file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        from cryoforum_plugin.formats.star import read_star

        return read_star(path, project_dir=project_dir)
    if suffix == ".cs":
        from cryoforum_plugin.formats.cs import read_cs

        return read_cs(path, project_dir=project_dir)
    raise CryoforumError(f"unknown particle file type '{suffix}'.", path=path, fix="pass a .star or .cs file.")


def write_particles(ps: ParticleSet, path, relative_to=None, project_dir=None, absolute_paths: bool = False) -> Path:
    """Write as ``.star`` or ``.cs`` by the file extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        from cryoforum_plugin.formats.star import write_star

        return write_star(ps, path, relative_to=relative_to, absolute_paths=absolute_paths)
    if suffix == ".cs":
        from cryoforum_plugin.formats.cs import write_cs

        return write_cs(ps, path, project_dir=project_dir)
    raise CryoforumError(f"unknown particle file type '{suffix}'.", path=path, fix="name the output .star or .cs.")


def output_paths(input_path, out_dir, stem: str, fmt: str = "auto") -> list[Path]:
    """Output file names for ``--format star|cs|both`` (``auto``: the input's format)."""
    if fmt == "auto":
        fmt = "cs" if Path(input_path).suffix.lower() == ".cs" else "star"
    exts = {"star": [".star"], "cs": [".cs"], "both": [".star", ".cs"]}[fmt]
    return [Path(out_dir) / f"{stem}{ext}" for ext in exts]


# Re-exports of the I/O modules, resolved on first use (PEP 562) so that star_io / cs_io can import this module
# first or second without a cycle.
_REEXPORTS = {
    "star": ("read_star", "write_star", "star_tables"),
    "cs": ("read_cs", "write_cs", "from_dataset", "to_dataset", "read_uncertainty_sidecar",
              "attach_uncertainty_sidecar", "uncertainty_sidecar_path", "uncertainty_dataset", "CS_BLOB_FIELDS",
              "CS_CTF_FIELDS",
              "CS_ALIGN_FIELDS", "CS_CRYOFORUM_FIELDS"),
}
_REEXPORT_MODULE = {name: module for module, names in _REEXPORTS.items() for name in names}


def __getattr__(name):
    module = _REEXPORT_MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __package__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_REEXPORT_MODULE))
