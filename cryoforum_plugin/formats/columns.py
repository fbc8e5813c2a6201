"""The column registry: each per-particle field of a ParticleSet with its RELION STAR column(s), its cryoSPARC .cs
field, dtype and unit; and every column name, field list and name set of the readers and writers, derived from it.

star.py and cs.py map the one-to-one columns (``star_unit`` / ``cs_unit`` None) through this table. The conversions
that are not one to one stay explicit functions: poses (quaternion <-> RELION Euler angles, cryoSPARC rotation
vectors: particles.file_poses / quats_from_file), shifts (Å <-> cryoSPARC px), CTF angles (deg <-> rad), 0- vs
1-based optics groups and half-sets, image names (``index@stack`` <-> blob/path + blob/idx), box (blob/shape).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Column:
    """One per-particle field of a ParticleSet and its names in the two file formats.

    ``field``: the ParticleSet attribute; ``attr.key`` for one key of a dict-valued attribute (``ctf``,
    ``uncertainty``); ``refine.*``: a refinement result, held in ``ParticleSet.numeric`` under both names.
    ``star``: its STAR column(s), one per component (angles, origins). ``cs``: its cryoSPARC Dataset field spec
    ``(name, dtype[, per-row shape])``; a name alone: written with the values' own dtype. ``dtype``, ``unit``: of the
    ParticleSet array. ``star_unit``, ``cs_unit``: how the file stores it where that is not the field's value as is
    (None: one to one).
    """

    field: str
    star: tuple[str, ...]
    cs: tuple
    dtype: str
    unit: str
    star_unit: str | None = None
    cs_unit: str | None = None

    @property
    def attr(self) -> str:
        """The ParticleSet attribute (``ctf`` for ``ctf.defocus_u``)."""
        return self.field.partition(".")[0]

    @property
    def key(self) -> str:
        """The key inside a dict-valued attribute ('' for an array attribute)."""
        return self.field.partition(".")[2]

    @property
    def cs_name(self) -> str:
        return self.cs[0]


_EULER, _ROTVEC = "deg, RELION ZYZ Euler angles (rot, tilt, psi)", "rad, cryoSPARC rotation vector"
OWN_COLUMNS = (
    Column("image_path", ("rlnImageName",), ("blob/path", "O"), "object", "absolute stack path",
           star_unit="stack of index@stack", cs_unit="path, project-relative or absolute"),
    Column("image_index", ("rlnImageName",), ("blob/idx", "u4"), "int64", "0-based index in the stack",
           star_unit="1-based index of index@stack"),
    Column("quat", ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), ("alignments3D/pose", "f4", (3,)), "float64",
           "(N, 4) quaternion (rotations.py), NaN rows unknown", star_unit=_EULER, cs_unit=_ROTVEC),
    Column("shift_A", ("rlnOriginXAngst", "rlnOriginYAngst"), ("alignments3D/shift", "f4", (2,)), "float64",
           "(N, 2) Å, RELION's origin sign", cs_unit="px of alignments3D/psize_A"),
    Column("pixel_size", ("rlnImagePixelSize",), ("blob/psize_A", "f4"), "float64", "Å"),
    Column("box", ("rlnImageSize",), ("blob/shape", "u4", (2,)), "int64", "px", cs_unit="(ny, nx) px"),
    Column("ctf.defocus_u", ("rlnDefocusU",), ("ctf/df1_A", "f4"), "float64", "Å"),
    Column("ctf.defocus_v", ("rlnDefocusV",), ("ctf/df2_A", "f4"), "float64", "Å"),
    Column("ctf.defocus_angle", ("rlnDefocusAngle",), ("ctf/df_angle_rad", "f4"), "float64", "deg", cs_unit="rad"),
    Column("ctf.voltage", ("rlnVoltage",), ("ctf/accel_kv", "f4"), "float64", "kV"),
    Column("ctf.cs", ("rlnSphericalAberration",), ("ctf/cs_mm", "f4"), "float64", "mm"),
    Column("ctf.amp_contrast", ("rlnAmplitudeContrast",), ("ctf/amp_contrast", "f4"), "float64", "fraction"),
    Column("ctf.phase_shift", ("rlnPhaseShift",), ("ctf/phase_shift_rad", "f4"), "float64", "deg", cs_unit="rad"),
    Column("optics_group", ("rlnOpticsGroup",), ("ctf/exp_group_id", "u4"), "int64", "1-based", cs_unit="0-based"),
    Column("half_set", ("rlnRandomSubset",), ("alignments3D/split", "u4"), "int64", "1 or 2, 0 unassigned",
           cs_unit="0 or 1"),
    Column("uid", ("rlnCryoforumUid",), ("uid", "u8"), "uint64", "particle id"),
)
"""The ParticleSet's own per-particle fields (the STAR and .cs writers derive these columns from them)."""
TYPED_COLUMNS = (
    Column("prior_quat", ("rlnCryoforumPriorAngleRot", "rlnCryoforumPriorAngleTilt", "rlnCryoforumPriorAnglePsi"),
           ("cryoforum/prior_pose", "f4", (3,)), "float64", "(N, 4) quaternion, NaN rows unknown",
           star_unit=_EULER, cs_unit=_ROTVEC),
    Column("predicted_quat", ("rlnCryoforumPredictedAngleRot", "rlnCryoforumPredictedAngleTilt",
                              "rlnCryoforumPredictedAnglePsi"),
           ("cryoforum/predicted_pose", "f4", (3,)), "float64", "(N, 4) quaternion, NaN rows unknown",
           star_unit=_EULER, cs_unit=_ROTVEC),
    Column("uncertainty.max", ("rlnCryoforumMaxDispersion",), ("cryoforum/max_dispersion", "f4"), "float64",
           "Bingham dispersion (<= 0)"),
    Column("uncertainty.trace", ("rlnCryoforumTraceDispersion",), ("cryoforum/trace_dispersion", "f4"), "float64",
           "Bingham dispersion (<= 0)"),
    Column("fom", ("rlnParticleFigureOfMerit",), ("cryoforum/fom", "f4"), "float64", "confidence in [0, 1]"),
    Column("junk", ("rlnCryoforumJunk",), ("cryoforum/junk", "u4"), "int64", "label, 0 = a real particle"),
    Column("image_sign", ("rlnCryoforumImageSign",), ("blob/sign", "f4"), "float64", "+1 or -1"),
)
"""The typed per-particle results of cryo-forum (None when a file has none), in the order STAR writers append them.
The input's pose (before prediction and refinement), the network's pose, uncertainty, figure of merit, junk label
of simulated truth files (sim.dataset.JUNK_KINDS) and the contrast sign of the stored image (cryoSPARC's
blob/sign; RELION has none, so STAR files carry rlnCryoforumImageSign; particles.ParticleSet.read_images)."""
REFINE_COLUMNS = (
    Column("refine.score", ("rlnCryoforumRefineScore",), ("cryoforum/refine_score",), "float", "normalised cc"),
    Column("refine.confidence", ("rlnCryoforumRefineConfidence",), ("cryoforum/refine_confidence",), "float",
           "confidence in [0, 1]"),
    Column("refine.cc_low", ("rlnCryoforumLowResMismatch",), ("cryoforum/low_res_mismatch",), "float",
           "1 - normalised cc at low resolution (refine/mismatch.py; high = junk)"),
    Column("refine.sector", ("rlnCryoforumSideExcess",), ("cryoforum/side_excess",), "float",
           "largest / smallest sector power of the residual outside the particle (refine/mismatch.py; >= 1)"),
)
"""Per-particle results of the refinement, held in ``numeric`` under both names (each writer takes its own)."""
COLUMNS = OWN_COLUMNS + TYPED_COLUMNS + REFINE_COLUMNS
"""The registry."""
COLUMN = {c.field: c for c in COLUMNS}
STAR_NAME = {c.field: c.star[0] if len(c.star) == 1 else c.star for c in COLUMNS}
"""field -> its STAR column (a tuple for a vector field: angles, origins)."""
CS_NAME = {c.field: c.cs_name for c in COLUMNS}
"""field -> its cryoSPARC field name."""


def _by_key(attr: str, names: dict) -> dict[str, str]:
    """key -> file name of the columns of a dict-valued attribute (``ctf``, ``uncertainty``, ``refine``)."""
    return {c.key: names[c.field] for c in COLUMNS if c.attr == attr}


CTF_COLUMNS = tuple(c for c in OWN_COLUMNS if c.attr == "ctf")
CTF_FIELDS = tuple(c.key for c in CTF_COLUMNS)
"""CTF parameters: defocus U/V (Å), astigmatism angle (deg), voltage (kV), Cs (mm), amplitude contrast,
phase shift (deg)."""
CTF_DEFAULTS = {"defocus_angle": 0.0, "phase_shift": 0.0, "voltage": 300.0, "cs": 2.7, "amp_contrast": 0.1}
"""What the readers take for a CTF parameter the file lacks (a missing defocus is NaN)."""
STAR_CTF = _by_key("ctf", STAR_NAME)
ANGLE_COLUMNS = STAR_NAME["quat"]
PRIOR_ANGLE_COLUMNS = STAR_NAME["prior_quat"]
"""The input's poses (e.g. the consensus refinement's), as the set had them before cryo-forum predicted or refined."""
PREDICTED_ANGLE_COLUMNS = STAR_NAME["predicted_quat"]
"""The network's predicted poses (kept when the refinement or a later RELION job replaces rlnAngle*)."""
UID_COLUMN = STAR_NAME["uid"]
JUNK_COLUMN, JUNK_CS = STAR_NAME["junk"], CS_NAME["junk"]
FOM_COLUMN, FOM_CS = STAR_NAME["fom"], CS_NAME["fom"]
IMAGE_SIGN_STAR, IMAGE_SIGN_CS = STAR_NAME["image_sign"], CS_NAME["image_sign"]
UNCERTAINTY_STAR = _by_key("uncertainty", STAR_NAME)  # {'max': rlnCryoforumMaxDispersion, 'trace': ...}
UNCERTAINTY_CS = _by_key("uncertainty", CS_NAME)
PRIOR_POSE_CS, PREDICTED_POSE_CS = CS_NAME["prior_quat"], CS_NAME["predicted_quat"]
REFINE_STAR = _by_key("refine", STAR_NAME)
REFINE_CS = _by_key("refine", CS_NAME)

TYPED_FIELDS = tuple(dict.fromkeys(c.attr for c in TYPED_COLUMNS))
"""The typed ParticleSet attributes: prior_quat, predicted_quat, uncertainty, fom, junk, image_sign."""
TYPED_STAR_COLUMNS = tuple(name for c in TYPED_COLUMNS for name in c.star)
"""STAR columns held by typed fields (never in ``numeric``), in the order writers append them."""
LEGACY_ORIGIN_COLUMNS = ("rlnOriginX", "rlnOriginY")
"""Origins in px (RELION 3.0), read as ``shift_A`` and replaced by rlnOriginX/YAngst on output."""
LEGACY_PIXEL_COLUMNS = ("rlnDetectorPixelSize", "rlnMagnification")
"""Pixel size as detector pixel (µm) over magnification (RELION 3.0), read when rlnImagePixelSize is missing."""
CORE_STAR_COLUMNS = frozenset({*(name for c in OWN_COLUMNS for name in c.star), *LEGACY_ORIGIN_COLUMNS,
                               *LEGACY_PIXEL_COLUMNS})
"""STAR columns the writers derive from the ParticleSet's own fields (never in ``numeric``)."""

CS_SHIFT_PIXEL = "alignments3D/psize_A"
"""The pixel size (Å) of alignments3D/shift, read and written with ``shift_A``."""
_CS_SLOT_ONLY = {spec[0]: spec for spec in [
    ("blob/import_sig", "u8"), ("ctf/type", "O"), ("ctf/scale", "f4"), ("ctf/scale_const", "f4"),
    ("ctf/shift_A", "f4", (2,)), ("ctf/tilt_A", "f4", (2,)), ("ctf/trefoil_A", "f4", (2,)), ("ctf/tetra_A", "f4", (4,)),
    ("ctf/anisomag", "f4", (4,)), ("ctf/bfactor", "f4"), (CS_SHIFT_PIXEL, "f4"), ("alignments3D/error", "f4"),
    ("alignments3D/class_posterior", "f4"), ("alignments3D/class", "u4")]}
"""Fields of cryoSPARC's slots that no ParticleSet field holds (allocated with their slot)."""


def cs_fields(*names: str) -> list[tuple]:
    """Dataset field specs ``(name, dtype[, shape])`` of .cs field names, in the order given: the registry's, else
    those of ``_CS_SLOT_ONLY``."""
    specs = {c.cs_name: c.cs for c in COLUMNS}
    return [specs[n] if n in specs else _CS_SLOT_ONLY[n] for n in names]


CS_BLOB_FIELDS = cs_fields("blob/path", "blob/idx", "blob/shape", "blob/psize_A", "blob/sign", "blob/import_sig")
CS_CTF_FIELDS = cs_fields("ctf/type", "ctf/exp_group_id", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast",
                          "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/phase_shift_rad", "ctf/scale",
                          "ctf/scale_const", "ctf/shift_A", "ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A",
                          "ctf/anisomag", "ctf/bfactor")
CS_ALIGN_FIELDS = cs_fields("alignments3D/split", "alignments3D/shift", "alignments3D/pose", CS_SHIFT_PIXEL,
                            "alignments3D/error", "alignments3D/class_posterior", "alignments3D/class")
"""cryoSPARC's blob, ctf and alignments3D slots, in the order cryoSPARC allocates them."""
CS_CRYOFORUM_FIELDS = cs_fields(*UNCERTAINTY_CS.values(), FOM_CS, JUNK_CS, PRIOR_POSE_CS, PREDICTED_POSE_CS)
"""The typed ParticleSet fields in a .cs, in the order the writer adds them: Bingham dispersions, figure of merit,
junk label, the input's pose (``prior_pose``) and the network's prediction (``predicted_pose``), both rotation
vectors in cryoSPARC's convention (radians; NaN where unknown); ``alignments3D/pose`` holds the current (predicted,
then refined) pose. Written only for the fields that are set."""
CORE_CS_FIELDS = frozenset({*(c.cs_name for c in OWN_COLUMNS + TYPED_COLUMNS), CS_SHIFT_PIXEL})
"""Fields held by the ParticleSet's own or typed fields (never in ``numeric``)."""
