"""Particle images for the engine: batches read from the stacks (memory-mapped, bounded open files), with an
optional in-memory cache for sets that fit, and the train/validation/test split."""

from __future__ import annotations

import numpy as np
import torch

from . import geometry
from .images import StackReader
from .particles import ParticleSet


class ImageSource:
    """Raw images of a ParticleSet by row: ``batch(rows) -> (B, N, N) float32 tensor``.

    Sets smaller than ``cache_bytes`` are read once and kept in memory (training reads each image every epoch);
    larger ones are streamed from the memory-mapped stacks on every read.
    """

    def __init__(self, ps: ParticleSet, cache_bytes: float = 2e9, max_open: int = 64):
        self.ps = ps
        self.reader = StackReader(max_open=max_open)
        box = int(ps.box[0]) if len(ps) else 0
        self._cache = None
        if len(ps) * box * box * 4 <= cache_bytes:
            self._cache = torch.from_numpy(self.reader.read(ps.image_path, ps.image_index))
            self.reader.close()

    def batch(self, rows) -> torch.Tensor:
        rows = np.asarray(rows)
        if self._cache is not None:
            return self._cache[torch.as_tensor(rows)]
        return torch.from_numpy(self.reader.read(self.ps.image_path[rows], self.ps.image_index[rows]))

    def close(self) -> None:
        self.reader.close()


def split_rows(n: int, val_fraction: float, test_fraction: float, seed: int, quat=None,
               stratify: bool = False) -> dict[str, np.ndarray]:
    """Row indices for 'train', 'val', 'test'. ``stratify``: each orientation bin (octant of the viewing direction
    × 2 tilt bands) is split in the same proportions, so every split covers the sphere."""
    rng = np.random.default_rng(seed)
    if stratify and quat is not None:
        d = geometry.viewing_direction(quat)
        bins = (d[:, 0] > 0) * 1 + (d[:, 1] > 0) * 2 + (d[:, 2] > 0) * 4 + (np.abs(d[:, 2]) > 0.5) * 8
        groups = [rng.permutation(np.nonzero(bins == b)[0]) for b in np.unique(bins)]
    else:
        groups = [rng.permutation(n)]
    out = {"train": [], "val": [], "test": []}
    for g in groups:
        n_test = int(round(test_fraction * len(g)))
        n_val = int(round(val_fraction * len(g)))
        out["test"].append(g[:n_test])
        out["val"].append(g[n_test:n_test + n_val])
        out["train"].append(g[n_test + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}
