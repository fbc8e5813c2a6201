"""Particle files that grow batch by batch (``cryoforum watch``, the RELION External job on a growing STAR): each
batch is written once, in the stream's layout, and each merged file is rebuilt from the batches' files.

STAR: the batches share one ``StarLayout`` (the particle columns of the first batch, in its order, and the optics
groups of every batch so far, numbered once for the whole stream), so the merged STAR is the newest batch's header
(its optics table holds every group) followed by the data rows of every batch, copied as bytes: a rebuild costs
the bytes of the file and the memory of one batch file, never a parse of the whole stream. .cs: the batches'
Datasets appended (their common fields).
"""

from __future__ import annotations

import dataclasses
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
    """Write one batch as a .cs whose blob paths resolve from ``out_dir`` (the directory of the merged file)."""
    ds = to_dataset(ps, project_dir=project_dir, out_dir=Path(out_dir).resolve())
    with atomic_path(path) as tmp:
        ds.save(str(tmp))


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


def merge_cs(parts: list, target) -> int:
    """Write ``target`` (atomically) as the batch .cs files ``parts`` appended; returns the number of rows."""
    from cryosparc.dataset import Dataset

    merged = Dataset.append_many(*(Dataset.load(str(p)) for p in parts))
    with atomic_path(target) as tmp:
        merged.save(str(tmp))
    return len(merged)
