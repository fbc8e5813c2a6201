"""cryoSPARC particle ``.cs`` files (NumPy structured arrays through cryosparc-tools' Dataset): reader and writer
of ParticleSet (field names and slot layouts from columns.py) and the uid-keyed uncertainty sidecar
(``<stem>_uncertainty.cs``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.formats.atomic import atomic_path
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.columns import (
    COLUMN, CORE_CS_FIELDS, CS_ALIGN_FIELDS, CS_BLOB_FIELDS, CS_CRYOFORUM_FIELDS, CS_CTF_FIELDS, CS_NAME,
    CS_SHIFT_PIXEL, CTF_COLUMNS, CTF_DEFAULTS, FOM_CS, IMAGE_SIGN_CS, UNCERTAINTY_CS, cs_fields,
)
from cryoforum_plugin.formats.particles import (
    ParticleSet, check_box, check_quats, quats_from_file, resolve_all, typed_columns, typed_from_columns,
)

_PATH, _INDEX, _BOX, _PIXEL = CS_NAME["image_path"], CS_NAME["image_index"], CS_NAME["box"], CS_NAME["pixel_size"]
_POSE, _SHIFT, _GROUP, _HALF = CS_NAME["quat"], CS_NAME["shift_A"], CS_NAME["optics_group"], CS_NAME["half_set"]


def ctf_from_cs(value, column) -> np.ndarray:
    """A CTF parameter in the ParticleSet's unit from its .cs field (radians -> degrees where ``cs_unit`` says)."""
    return np.rad2deg(value) if column.cs_unit == "rad" else value


def ctf_to_cs(value, column) -> np.ndarray:
    """A CTF parameter in its .cs field's unit (degrees -> radians where ``cs_unit`` says)."""
    return np.deg2rad(value) if column.cs_unit == "rad" else value


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


def _numeric_fields(ds, fields) -> dict[str, np.ndarray]:
    """Scalar numeric fields other than those held by the ParticleSet's own or typed fields."""
    out = {}
    for f in fields:
        if f in CORE_CS_FIELDS:
            continue
        a = np.asarray(ds[f])
        if a.ndim == 1 and a.dtype.kind in "biuf":
            out[f] = a
    return out


def from_dataset(ds, path=None, project_dir=None) -> ParticleSet:
    """A ``ParticleSet`` from an in-memory cryoSPARC ``Dataset`` (as ``read_cs``)."""
    fields = list(ds.fields())
    for need in (_PATH, _INDEX, _BOX, _PIXEL):
        if need not in fields:
            raise CryoforumError(f"the .cs file has no '{need}' field (no particle images).", path=path,
                                 fix="export the particles with their blob slot (e.g. from an Extract or Refine "
                                     "job's 'particles' output, not only alignments).")
    n = len(ds)
    raw = np.array([p.decode() if isinstance(p, bytes) else str(p) for p in ds[_PATH]], dtype=object)
    raw = np.array([p[1:] if p.startswith(">") else p for p in raw], dtype=object)
    if project_dir:
        roots = [Path(project_dir)]
    else:
        base = Path(path).resolve().parent if path else Path.cwd()
        roots = [base, base.parent, base.parent.parent, Path.cwd()]
    image_path = resolve_all(raw, roots)
    box = np.asarray(ds[_BOX])[:, -1].astype(np.int64)
    check_box(box, path)
    pixel = np.asarray(ds[_PIXEL], dtype=np.float64)
    quat = np.full((n, 4), np.nan)
    shift = np.zeros((n, 2))
    half = np.zeros(n, np.int64)
    if _POSE in fields:
        pose = np.asarray(ds[_POSE], dtype=np.float64)
        check_quats(pose, path, _POSE)
        quat = quats_from_file(pose, "cs")
        if _SHIFT in fields:  # px of CS_SHIFT_PIXEL (else of the image) -> Å
            apix = np.asarray(ds[CS_SHIFT_PIXEL], dtype=np.float64) if CS_SHIFT_PIXEL in fields else pixel
            apix = np.where(apix > 0, apix, pixel)
            shift = np.asarray(ds[_SHIFT], dtype=np.float64) * apix[:, None]
            if not np.isfinite(shift).all():
                r = int(np.argmax(~np.isfinite(shift).all(axis=1)))
                raise CryoforumError(f"{_SHIFT} contains NaN.", path=path, row=r, fix="remove the particle.")
        if _HALF in fields:
            half = np.asarray(ds[_HALF], dtype=np.int64) + 1
    ctf = None
    if CS_NAME["ctf.defocus_u"] in fields:
        ctf = {c.key: ctf_from_cs(np.asarray(ds[c.cs_name], dtype=np.float64), c) if c.cs_name in fields
               else np.full(n, CTF_DEFAULTS.get(c.key, np.nan), float) for c in CTF_COLUMNS}
    group = np.asarray(ds[_GROUP], dtype=np.int64) + 1 if _GROUP in fields else np.ones(n, np.int64)
    return ParticleSet(image_path=image_path, image_index=np.asarray(ds[_INDEX], dtype=np.int64), quat=quat,
                       shift_A=shift, pixel_size=pixel, box=box, ctf=ctf, optics_group=group, half_set=half,
                       uid=np.asarray(ds[CS_NAME["uid"]], dtype=np.uint64),
                       source={"format": "cs", "dataset": ds, "project_dir": roots[0]}, path=path,
                       numeric=_numeric_fields(ds, fields), file_format="cs", **typed_from_columns(ds, "cs"))


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


def _write_typed(typed: dict, ds) -> None:
    """The typed fields (``typed_columns(ps, 'cs')``) as CS_CRYOFORUM_FIELDS, in that order; a typed field that is
    None drops its field."""
    spec = {f[0]: f for f in CS_CRYOFORUM_FIELDS}
    values = {name: typed[name] for name in spec if name in typed}
    stale = [f for f in spec if f in ds.fields() and f not in values]
    if stale:
        ds.drop_fields(stale)
    for name, v in values.items():
        _set_field(ds, spec[name], v)


def to_dataset(ps: ParticleSet, project_dir=None, out_dir=None):
    """A cryoSPARC ``Dataset`` for the set: the original Dataset's fields kept (same uids), poses, shifts,
    CTF and half-sets written in cryoSPARC's convention (rotation vector, shift in pixels), the typed fields as
    ``CS_CRYOFORUM_FIELDS`` and ``ps.numeric`` values with cryoSPARC field names. ``blob/sign`` is ``ps.image_sign``
    (the input's), or +1 for a set without one (STAR: RELION's contrast, columns.IMAGE_SIGN_CS). ``out_dir``:
    where the .cs will live (blob paths that would no longer resolve from there are re-based)."""
    from cryosparc.dataset import Dataset

    src = ps.source
    if src.get("format") == "cs":
        ds = src["dataset"].copy()
        ds[_PATH] = _portable_blob_paths(ds[_PATH], ps.image_path, out_dir, project_dir)
    else:
        ds = Dataset.allocate(len(ps), CS_BLOB_FIELDS + (CS_CTF_FIELDS if ps.ctf is not None else []))
        ds[CS_NAME["uid"]] = ps.uid
        root = Path(project_dir).resolve() if project_dir else None
        paths = []
        for p in ps.image_path:
            if root is not None and Path(p).is_relative_to(root):
                p = os.path.relpath(p, root)
            paths.append(p)
        ds[_PATH] = np.array(paths, dtype=object)
        ds[_INDEX] = ps.image_index
        ds[_BOX] = np.stack([ps.box, ps.box], 1)
        ds[_PIXEL] = ps.pixel_size
        ds[IMAGE_SIGN_CS] = 1.0  # RELION's contrast (light particles), unless the set says otherwise (below)
        if ps.ctf is not None:
            ds["ctf/type"] = np.array(["spline"] * len(ps), dtype=object)
            ds[_GROUP] = ps.optics_group - 1
            ds["ctf/scale"] = 1.0
            ds["ctf/scale_const"] = 0.0
    if ps.ctf is not None:
        missing = [f for f in CS_CTF_FIELDS if f[0] not in ds.fields()]
        if missing:
            ds.add_fields(missing)
        for column in CTF_COLUMNS:
            ds[column.cs_name] = ctf_to_cs(ps.ctf[column.key], column)
    if ps.has_poses.any() or (ps.shift_A != 0).any():
        missing = [f for f in CS_ALIGN_FIELDS if f[0] not in ds.fields()]
        if missing:
            ds.add_fields(missing)
        pose = np.zeros((len(ps), 3))
        pose[ps.has_poses] = rotations.quat_to_cryosparc_pose(ps.quat[ps.has_poses])  # unknown: 0, not NaN
        ds[_POSE] = pose
        ds[_SHIFT] = ps.shift_A / ps.pixel_size[:, None]  # Å -> px of CS_SHIFT_PIXEL
        ds[CS_SHIFT_PIXEL] = ps.pixel_size
        if (ps.half_set > 0).any():
            ds[_HALF] = np.clip(ps.half_set - 1, 0, 1)
    typed = typed_columns(ps, "cs")
    if IMAGE_SIGN_CS in typed:  # the sign the input had (or a STAR's rlnCryoforumImageSign)
        _set_field(ds, COLUMN["image_sign"].cs, typed[IMAGE_SIGN_CS])
    _write_typed(typed, ds)
    for name, values in ps.numeric.items():
        if "/" in name and name not in CORE_CS_FIELDS:
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
    lookup = {int(u): i for i, u in enumerate(side[CS_NAME["uid"]])}
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

    ds = Dataset.allocate(len(ps), cs_fields(*UNCERTAINTY_CS.values(), FOM_CS))
    ds[CS_NAME["uid"]] = ps.uid
    ds[UNCERTAINTY_CS["max"]] = ps.uncertainty["max"]
    ds[UNCERTAINTY_CS["trace"]] = ps.uncertainty["trace"]
    ds[FOM_CS] = ps.fom
    return ds
