"""Particle files that grow batch by batch (``cryoforum watch``, the RELION External job on a growing STAR): each
batch is written once, in the stream's layout, and each merged file is rebuilt from the batches' files.

STAR: the batches share one ``StarLayout`` (the particle columns of the first batch, in its order, and the optics
groups of every batch so far, numbered once for the whole stream), so the merged STAR is the newest batch's header
(its optics table holds every group) followed by the data rows of every batch, copied as bytes: a rebuild costs
the bytes of the file and the memory of one batch file, never a parse of the whole stream. .cs: the batches are
NumPy .npy structured arrays (cryosparc-tools' default ``Dataset.save`` format), so the merged .cs is one .npy
header (the batches' common fields, each string field as wide as the widest batch's, for the total row count)
followed by each batch's rows converted to that dtype, a chunk at a time: what ``Dataset.append_many(...).save()``
writes, at the memory of one chunk (at most ``_CS_CHUNK_BYTES``) instead of the whole stream.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.atomic import atomic_path
from cryoforum_plugin.formats.columns import STAR_NAME
from cryoforum_plugin.formats.cs import to_dataset
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.formats.star import star_tables

_GROUP = STAR_NAME["optics_group"]
_GROUP_NAME = "rlnOpticsGroupName"


@dataclasses.dataclass
class StarLayout:
    """The layout every batch of one merged STAR is written in: ``columns`` (the particle table's, in order) and
    ``optics`` (every optics group of the stream, numbered once); both None before the first batch."""

    columns: list[str] | None = None
    optics: pd.DataFrame | None = None

    @classmethod
    def of_file(cls, path) -> "StarLayout":
        """The layout a batch file was written in (the newest batch's optics table holds every group so far)."""
        blocks = starfile.read(path, always_dict=True)
        return cls(list(blocks["particles"].columns), blocks["optics"])


def _value_key(value):
    """An optics value as compared between batches: floats to 6 decimals (the files' precision), else its text."""
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    return str(value)


def _merge_optics(registry: pd.DataFrame, optics: pd.DataFrame, source) -> tuple[pd.DataFrame, dict]:
    """(the registry with ``optics``' new groups appended, {the batch's group number: the stream's}). A group is
    the same when every optics column but the number and name has the same value."""
    missing = [c for c in registry.columns if c not in optics]
    if missing:
        raise CryoforumError(f"the optics table has no {missing[0]}, which the particles already written have.",
                             path=source, fix="give one output directory particles with the same optics columns.")
    keys = [c for c in registry.columns if c not in (_GROUP, _GROUP_NAME)]
    known = {tuple(_value_key(v) for v in row[keys]): int(row[_GROUP]) for _, row in registry.iterrows()}
    names = set(registry[_GROUP_NAME].astype(str)) if _GROUP_NAME in registry else set()
    added, mapping = [], {}
    for _, row in optics.iterrows():
        key = tuple(_value_key(v) for v in row[keys])
        if key not in known:
            new = row[list(registry.columns)].copy()
            new[_GROUP] = known[key] = int(registry[_GROUP].max()) + 1 + len(added)
            if _GROUP_NAME in new and str(new[_GROUP_NAME]) in names:
                new[_GROUP_NAME] = f"opticsGroup{new[_GROUP]}"
            names.add(str(new.get(_GROUP_NAME, "")))
            added.append(new)
        mapping[int(row[_GROUP])] = known[key]
    if added:
        registry = pd.concat([registry, pd.DataFrame(added)], ignore_index=True)
    return registry, mapping


def conform(tables: dict, layout: StarLayout, source=None) -> tuple[dict, StarLayout, list[str]]:
    """(``tables`` in ``layout``, the layout after them, the particle columns dropped). ``tables``: star_tables'
    {'optics', 'particles'}. The first batch sets the layout; later ones are renumbered into its optics groups (new
    groups appended) and reordered to its columns; a column the layout has and the batch lacks is one error naming
    ``source`` (the batch's input file)."""
    optics, particles = tables["optics"].reset_index(drop=True), tables["particles"]
    if layout.columns is None:
        return {"optics": optics, "particles": particles}, StarLayout(list(particles.columns), optics), []
    missing = [c for c in layout.columns if c not in particles]
    if missing:
        raise CryoforumError(f"these particles have no column {missing[0]}, which the particles already written "
                             "have.", path=source,
                             fix="give one output directory particles with the same columns (or start a new one).")
    registry, mapping = _merge_optics(layout.optics, optics, source)
    out = particles[layout.columns].copy()
    out[_GROUP] = np.array([mapping[int(g)] for g in particles[_GROUP]], dtype=np.int64)
    dropped = [c for c in particles.columns if c not in layout.columns]
    return {"optics": registry, "particles": out}, StarLayout(layout.columns, registry), dropped


def write_batch_star(ps: ParticleSet, path, relative_to, layout: StarLayout,
                     source=None) -> tuple[StarLayout, list[str]]:
    """Write one batch as a STAR in the stream's ``layout`` (``conform``), image names as ``write_star`` writes them
    for a file in ``relative_to`` (the directory of the merged file); returns (the new layout, dropped columns)."""
    tables, layout, dropped = conform(star_tables(ps, relative_to=relative_to), layout, source)
    with atomic_path(path) as tmp:
        starfile.write(tables, tmp, float_format="%.6f")
    return layout, dropped


def write_batch_cs(ps: ParticleSet, path, out_dir, project_dir=None) -> None:
    """Write one batch as a .cs whose blob paths resolve from ``out_dir`` (the directory of the merged file), in
    the .npy format (``merge_cs`` streams its rows)."""
    from cryosparc.dataset import NUMPY_FORMAT

    ds = to_dataset(ps, project_dir=project_dir, out_dir=Path(out_dir).resolve())
    with atomic_path(path) as tmp:
        ds.save(str(tmp), format=NUMPY_FORMAT)


def _body(data: bytes) -> tuple[int, int]:
    """(start, end) byte offsets of the particle rows of a batch STAR written by ``write_batch_star``: its last
    block, data_particles (found as the first such line, before any particle row); start is also the end of the
    header (the line after the last column label)."""
    pos = data.index(b"\n", data.index(b"loop_", data.index(b"\ndata_particles"))) + 1
    while data.startswith(b"_", pos):
        pos = data.index(b"\n", pos) + 1
    return pos, max(pos, len(data.rstrip()))


def merge_star(parts: list, target) -> int:
    """Write ``target`` (atomically) as the header of the last of ``parts`` (batch STAR files of one layout) and
    the data rows of all of them, in order; returns the number of rows."""
    parts = [Path(p) for p in parts]
    last = parts[-1].read_bytes()
    rows = 0
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(last[:_body(last)[0]])
        for part in parts:
            data = last if part == parts[-1] else part.read_bytes()
            start, end = _body(data)
            if end > start:
                out.write(data[start:end])
                out.write(b"\n")
                rows += data.count(b"\n", start, end) + 1
        out.write(b"\n")
    return rows


_CS_CHUNK_BYTES = 1 << 23  # rows of a batch .cs converted and written at a time: at most 8 MiB


def _npy_header(f, path) -> tuple[int, np.dtype]:
    """(rows, dtype) of the .npy file open as ``f`` (a batch .cs), read from its header only; ``f`` is left at the
    first row. One clear error for a file that is not a 1-D .npy structured array."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if len(shape) != 1 or fortran or dtype.names is None:
            raise ValueError(f"an array of shape {shape}, not a table")
        if os.fstat(f.fileno()).st_size - f.tell() != shape[0] * dtype.itemsize:
            raise ValueError(f"not the {shape[0]} rows its header says: truncated")
    except ValueError as exc:
        raise CryoforumError(f"cannot read this batch .cs file ({exc}).", path=path,
                             fix="restore it, or start again: a new --out (or this one without watch_state/ and its "
                                 "outputs) processes every particle again.") from None
    return shape[0], dtype


def _cs_union_dtype(headers: list[tuple[int, np.dtype]]) -> np.dtype:
    """The dtype ``Dataset.append_many(...).save()`` gives the batches of ``headers`` [(rows, dtype)]: the fields
    (as cryosparc-tools compares them: strings of any width alike) of every batch with rows (of the first batch
    when none has), 'uid' first then in the first such batch's order; a string field as wide as its widest."""
    from cryosparc.dataset.dtype import normalize_field

    full = [dt for rows, dt in headers if rows > 0] or [headers[0][1]]

    def fields(dt):
        return {normalize_field(name, dt.fields[name][0]): name for name in dt.names}

    common = set.intersection(*(set(fields(dt)) for dt in full))
    names = sorted((name for key, name in fields(full[0]).items() if key in common), key=lambda n: n != "uid")
    out = []
    for name in names:
        _, base, *shape = normalize_field(name, full[0].fields[name][0])
        if full[0].fields[name][0].kind == "S":
            out.append((name, f"S{max(dt.fields[name][0].itemsize for dt in full)}"))
        else:
            out.append((name, base, *shape))
    return np.dtype(out)


def _write_npy_header(out, rows: int, dtype: np.dtype) -> None:
    """The .npy header ``np.save`` writes for a (rows,) array of ``dtype`` (format 1.0, or 2.0 when too large)."""
    from numpy.lib import format as npy

    header = {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows,)}
    try:
        npy.write_array_header_1_0(out, header)
    except ValueError:
        npy.write_array_header_2_0(out, header)


def _copy_rows(f, rows: int, dtype: np.dtype, union: np.dtype, out) -> None:
    """Append the ``rows`` rows of ``dtype`` that ``f`` holds from its position to ``out``, as ``union`` (its
    fields; strings padded with NULs to their width), a chunk of at most ``_CS_CHUNK_BYTES`` at a time."""
    step = max(1, _CS_CHUNK_BYTES // max(dtype.itemsize, union.itemsize))
    for start in range(0, rows, step):
        count = min(step, rows - start)
        chunk = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
        converted = np.empty(count, union)
        for name in union.names:
            converted[name] = chunk[name]
        out.write(converted.data)


def merge_cs(parts: list, target) -> int:
    """Write ``target`` (atomically) as the batch .cs files ``parts`` (.npy, ``write_batch_cs``) appended: the
    content of ``Dataset.append_many(*parts).save()`` (``_cs_union_dtype``), streamed from the batch files with
    the memory of one chunk (``_copy_rows``); returns the number of rows. The batches' uids are not compared: a
    stream's batches hold distinct particles (keyed by uid)."""
    parts = [Path(p) for p in parts]
    headers = []
    for part in parts:
        with open(part, "rb") as f:
            headers.append(_npy_header(f, part))
    union = _cs_union_dtype(headers)
    total = sum(rows for rows, _ in headers)
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        _write_npy_header(out, total, union)
        for part, (rows, dtype) in zip(parts, headers):
            with open(part, "rb") as f:
                _npy_header(f, part)
                _copy_rows(f, rows, dtype, union, out)
    return total
