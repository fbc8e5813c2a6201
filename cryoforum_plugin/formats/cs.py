"""cryoSPARC particle ``.cs`` files (NumPy structured arrays through cryosparc-tools' Dataset): reader and writer
of ParticleSet, the field lists, and the uid-keyed uncertainty sidecar (``<stem>_uncertainty.cs``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryoforum_plugin.physics import rotations as geometry
from cryoforum_plugin.formats.atomic import atomic_path
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.particles import (
    FOM_CS, IMAGE_SIGN_CS, JUNK_CS, PREDICTED_POSE_CS, PRIOR_POSE_CS, UNCERTAINTY_CS, ParticleSet, check_box,
    check_quats, finite_rows, image_signs, resolve_all,
)

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
CS_CRYOFORUM_FIELDS = [(UNCERTAINTY_CS["max"], "f4"), (UNCERTAINTY_CS["trace"], "f4"), (FOM_CS, "f4"),
                       (JUNK_CS, "u4"), (PRIOR_POSE_CS, "f4", (3,)), (PREDICTED_POSE_CS, "f4", (3,))]
"""The typed ParticleSet fields in a .cs: Bingham dispersions, figure of merit, junk label, the input's pose
(``prior_pose``) and the network's prediction (``predicted_pose``), both rotation vectors in cryoSPARC's convention
(radians; NaN where unknown); ``alignments3D/pose`` holds the current (predicted, then refined) pose. Written only
for the fields that are set."""
_CORE_CS_FIELDS = frozenset({"uid", "blob/path", "blob/idx", "blob/shape", "blob/psize_A", IMAGE_SIGN_CS,
                             "ctf/df1_A", "ctf/df2_A",
                             "ctf/df_angle_rad", "ctf/phase_shift_rad", "ctf/accel_kv", "ctf/cs_mm",
                             "ctf/amp_contrast", "ctf/exp_group_id", "alignments3D/pose", "alignments3D/shift",
                             "alignments3D/psize_A", "alignments3D/split"}
                            | {f[0] for f in CS_CRYOFORUM_FIELDS})
"""Fields held by the ParticleSet's own or typed fields (never in ``numeric``)."""


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


def _typed_fields(ds, fields) -> dict:
    """The typed ParticleSet fields a Dataset holds (CS_CRYOFORUM_FIELDS, and ``image_sign`` from blob/sign)."""
    out = {}
    if all(UNCERTAINTY_CS[k] in fields for k in ("max", "trace")):
        out["uncertainty"] = {k: np.asarray(ds[UNCERTAINTY_CS[k]], np.float64) for k in ("max", "trace")}
    if FOM_CS in fields:
        out["fom"] = np.asarray(ds[FOM_CS], np.float64)
    if JUNK_CS in fields:
        out["junk"] = np.asarray(ds[JUNK_CS]).astype(np.int64)
    for name, field in (("prior_quat", PRIOR_POSE_CS), ("predicted_quat", PREDICTED_POSE_CS)):
        if field in fields:
            pose = np.asarray(ds[field], np.float64)
            quat = np.full((len(pose), 4), np.nan)
            ok = np.isfinite(pose).all(axis=1)
            if ok.any():
                quat[ok] = geometry.cryosparc_pose_to_quat(pose[ok])
            out[name] = quat
    if IMAGE_SIGN_CS in fields:
        out["image_sign"] = image_signs(ds[IMAGE_SIGN_CS])
    return out


def _numeric_fields(ds, fields) -> dict[str, np.ndarray]:
    """Scalar numeric fields other than those held by the ParticleSet's own or typed fields."""
    out = {}
    for f in fields:
        if f in _CORE_CS_FIELDS:
            continue
        a = np.asarray(ds[f])
        if a.ndim == 1 and a.dtype.kind in "biuf":
            out[f] = a
    return out


def from_dataset(ds, path=None, project_dir=None) -> ParticleSet:
    """A ``ParticleSet`` from an in-memory cryoSPARC ``Dataset`` (as ``read_cs``)."""
    fields = list(ds.fields())
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
    image_path = resolve_all(raw, roots)
    box = np.asarray(ds["blob/shape"])[:, -1].astype(np.int64)
    check_box(box, path)
    pixel = np.asarray(ds["blob/psize_A"], dtype=np.float64)
    quat = np.full((n, 4), np.nan)
    shift = np.zeros((n, 2))
    half = np.zeros(n, np.int64)
    if "alignments3D/pose" in fields:
        pose = np.asarray(ds["alignments3D/pose"], dtype=np.float64)
        check_quats(pose, path, "alignments3D/pose")
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
                       source={"format": "cs", "dataset": ds, "project_dir": roots[0]}, path=path,
                       numeric=_numeric_fields(ds, fields), file_format="cs", **_typed_fields(ds, fields))


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


def _set_field(ds, spec, values) -> None:
    if spec[0] not in ds.fields():
        ds.add_fields([spec])
    ds[spec[0]] = values


def _write_typed(ps: ParticleSet, ds) -> None:
    """The typed fields as cryoforum/* fields; a typed field that is None drops its field."""
    spec = {f[0]: f for f in CS_CRYOFORUM_FIELDS}
    values = {}
    if ps.uncertainty is not None:
        values.update({UNCERTAINTY_CS[k]: ps.uncertainty[k] for k in ("max", "trace")})
    if ps.fom is not None:
        values[FOM_CS] = ps.fom
    if ps.junk is not None:
        values[JUNK_CS] = ps.junk
    if ps.prior_quat is not None:
        values[PRIOR_POSE_CS] = finite_rows(ps.prior_quat, geometry.quat_to_cryosparc_pose)
    if ps.predicted_quat is not None:
        values[PREDICTED_POSE_CS] = finite_rows(ps.predicted_quat, geometry.quat_to_cryosparc_pose)
    stale = [f for f in spec if f in ds.fields() and f not in values]
    if stale:
        ds.drop_fields(stale)
    for name, v in values.items():
        _set_field(ds, spec[name], v)


def to_dataset(ps: ParticleSet, project_dir=None, out_dir=None):
    """A cryoSPARC ``Dataset`` for the set: the original Dataset's fields kept (same uids), poses, shifts,
    CTF and half-sets written in cryoSPARC's convention (rotation vector, shift in pixels), the typed fields as
    ``CS_CRYOFORUM_FIELDS`` and ``ps.numeric`` values with cryoSPARC field names. ``blob/sign`` is ``ps.image_sign``
    (the input's), or +1 for a set without one (STAR: RELION's contrast, particles.IMAGE_SIGN_CS). ``out_dir``:
    where the .cs will live (blob paths that would no longer resolve from there are re-based)."""
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
        ds[IMAGE_SIGN_CS] = 1.0  # RELION's contrast (light particles), unless the set says otherwise (below)
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
    if ps.image_sign is not None:  # the sign the input had (or a STAR's rlnCryoforumImageSign)
        _set_field(ds, (IMAGE_SIGN_CS, "f4"), ps.image_sign)
    _write_typed(ps, ds)
    for name, values in ps.numeric.items():
        if "/" in name and name not in _CORE_CS_FIELDS:
            values = np.asarray(values)
            _set_field(ds, (name, values.dtype.str), values)
    return ds


def write_cs(ps: ParticleSet, path, project_dir=None) -> Path:
    """Write the set as a cryoSPARC ``.cs`` file, atomically. See ``to_dataset``."""
    ds = to_dataset(ps, project_dir=project_dir, out_dir=Path(path).resolve().parent)
    with atomic_path(path) as tmp:
        ds.save(str(tmp))
    return Path(path)


# ------------------------------------------------------------------------------------------ uncertainty sidecar


def uncertainty_sidecar_path(ps: ParticleSet) -> Path | None:
    """``<stem>_uncertainty.cs`` beside the .cs the set was read from (None for a set not read from a file)."""
    return None if ps.path is None else Path(ps.path).with_name(Path(ps.path).stem + "_uncertainty.cs")


def read_uncertainty_sidecar(ps: ParticleSet, sidecar=None) -> dict[str, np.ndarray]:
    """{'max', 'trace', 'fom'} per particle of ``ps`` from a uid-keyed sidecar (cryoforum/max_dispersion,
    trace_dispersion, fom; written by ``cryoforum predict`` for .cs outputs); default path:
    ``uncertainty_sidecar_path``."""
    path = Path(sidecar) if sidecar else uncertainty_sidecar_path(ps)
    if path is None or not path.exists():
        raise CryoforumError("no uncertainty sidecar for this .cs prediction.", path=path,
                             fix="pass the predicted_uncertainty.cs written by `cryoforum predict` (--uncertainty).")
    side = _load_dataset(path)
    for need in (*UNCERTAINTY_CS.values(), FOM_CS):
        if need not in side.fields():
            raise CryoforumError(f"the uncertainty sidecar has no '{need}' field.", path=path,
                                 fix="use the sidecar written together with this prediction.")
    lookup = {int(u): i for i, u in enumerate(side["uid"])}
    idx = np.array([lookup.get(int(u), -1) for u in ps.uid], dtype=np.int64)
    if (idx < 0).any():
        r = int(np.argmax(idx < 0))
        raise CryoforumError(f"particle uid {int(ps.uid[r])} is not in the uncertainty sidecar.", path=path,
                             row=r, fix="use the sidecar written together with this prediction.")
    return {"max": np.asarray(side[UNCERTAINTY_CS["max"]], np.float64)[idx],
            "trace": np.asarray(side[UNCERTAINTY_CS["trace"]], np.float64)[idx],
            "fom": np.asarray(side[FOM_CS], np.float64)[idx]}


def attach_uncertainty_sidecar(ps: ParticleSet, sidecar=None) -> ParticleSet:
    """Fill ``ps.uncertainty`` and ``ps.fom`` (in place) from the sidecar; returns ``ps``."""
    unc = read_uncertainty_sidecar(ps, sidecar)
    ps.uncertainty = {"max": unc["max"], "trace": unc["trace"]}
    ps.fom = unc["fom"]
    return ps


def uncertainty_dataset(ps: ParticleSet):
    """The uid-keyed uncertainty sidecar of a prediction (cryoSPARC keeps only its declared slots in job
    outputs): a Dataset with uid and cryoforum/{max_dispersion, trace_dispersion, fom}."""
    from cryosparc.dataset import Dataset

    ds = Dataset.allocate(len(ps), [(UNCERTAINTY_CS["max"], "f4"), (UNCERTAINTY_CS["trace"], "f4"), (FOM_CS, "f4")])
    ds["uid"] = ps.uid
    ds[UNCERTAINTY_CS["max"]] = ps.uncertainty["max"]
    ds[UNCERTAINTY_CS["trace"]] = ps.uncertainty["trace"]
    ds[FOM_CS] = ps.fom
    return ds
