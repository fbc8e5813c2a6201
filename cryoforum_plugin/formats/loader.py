"""Particle images for the engine: batches read from the stacks (positional reads, bounded open files) by loader
processes that run ahead of the network, an in-memory cache for sets that fit, and the train/validation/test split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.particles import ParticleSet, apply_image_sign

MAX_AUTO_WORKERS = 8
GPU_CACHE_FRACTION = 0.25
"""A cached image set is kept in GPU memory when it takes at most this share of the GPU's free memory (the rest is
left to the network's activations, the optimiser and the pre-training simulator)."""


def cache_on_device(nbytes: int, device) -> bool:
    """Whether a cached image set of ``nbytes`` bytes lives on ``device`` rather than in host memory: only on a
    CUDA device that torch can use, and only when it fits in GPU_CACHE_FRACTION of that GPU's free memory
    (torch.cuda.mem_get_info, read when the cache is made)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return nbytes <= GPU_CACHE_FRACTION * free


def auto_workers(device: torch.device) -> int:
    """Loader processes for ``--workers -1``: on a GPU one per spare core of this rank's share (at most 8); on
    the CPU none, since the forward pass already uses every core (benchmarks/RESULTS.md)."""
    if device.type != "cuda":
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores // local - 1))


class _RowBatches(torch.utils.data.Dataset):
    """Item ``rows`` (an array of row indices, one batch) = (rows, (B, N, N) images); each loader process opens
    its own files. ``signs``: (N,) contrast signs (ParticleSet.image_sign) or None. A CryoforumError travels back
    as its fields, so the main process prints it as one line."""

    def __init__(self, paths: np.ndarray, indices: np.ndarray, signs=None):
        self.paths, self.indices, self.signs = paths, indices, signs
        self.reader = None

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        if self.reader is None:
            self.reader = StackReader()
        try:
            images = self.reader.read(self.paths[rows], self.indices[rows])
            signs = None if self.signs is None else self.signs[rows]
            return rows, torch.from_numpy(apply_image_sign(images, signs)), None
        except CryoforumError as exc:
            return rows, None, {"message": exc.message, "path": exc.path and str(exc.path), "row": exc.row,
                                "fix": exc.fix}


class _Batches(torch.utils.data.Sampler):
    """The batches of rows of the current pass (``batches``, set before each pass): the loader's sampler, so one
    loader (its processes persistent) serves every pass."""

    def __init__(self):
        self.batches: Sequence[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class ImageSource:
    """Raw images of a ParticleSet by row: ``batch(rows) -> (B, N, N) float32 tensor``, with their contrast sign
    applied (``ParticleSet.read_images``).

    Sets smaller than ``cache_bytes`` are read once and kept in memory (training reads each image every epoch):
    on ``device`` when it is a GPU with room for them (``cache_on_device``: batches are then gathered there, no
    copy at all), else in host memory, whose batches for a GPU are gathered into pinned memory (``batches``'
    ``pin_memory``: their copies are asynchronous). Larger sets are read from the stacks on every pass
    (``batches``: by loader processes, ahead of the network; the processes persist from pass to pass, each with
    its open files, until ``close``).
    """

    def __init__(self, ps: ParticleSet, cache_bytes: float = 2e9, max_open: int = 64, device=None):
        self.ps = ps
        self.reader = StackReader(max_open=max_open)
        box = int(ps.box[0]) if len(ps) else 0
        self._cache = None
        self._loader, self._sampler = None, _Batches()
        if len(ps) * box * box * 4 <= cache_bytes:
            self._cache = torch.from_numpy(ps.read_images(self.reader, np.arange(len(ps))))
            self.reader.close()
            if cache_on_device(self._cache.nbytes, device):
                self._cache = self._cache.to(device)

    def batch(self, rows, pin_memory: bool = False) -> torch.Tensor:
        """(B, N, N) float32 images of ``rows``: on the cache's device (the CPU for a streamed set);
        ``pin_memory``: a batch in host memory is made in pinned memory (for asynchronous copies to a GPU)."""
        rows = np.asarray(rows)
        if self._cache is None:
            images = torch.from_numpy(self.ps.read_images(self.reader, rows))
            return images.pin_memory() if pin_memory else images
        index = torch.as_tensor(rows).to(self._cache.device)
        if not pin_memory or self._cache.is_cuda:
            return self._cache[index]
        out = torch.empty((len(rows), *self._cache.shape[1:]), dtype=self._cache.dtype, pin_memory=True)
        return torch.index_select(self._cache, 0, index, out=out)  # gathered straight into pinned memory

    def batches(self, rows: np.ndarray, batch: int, workers: int = 0,
                pin_memory: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (rows, (B, N, N) images) for consecutive chunks of ``batch`` of ``rows``, in order. With
        ``workers`` > 0 and a streamed set, that many processes read ahead (2 batches each; started on the first
        such pass and kept for the next ones: ``_loader_for``); ``pin_memory`` for fast copies to a GPU."""
        batches = [rows[lo:lo + batch] for lo in range(0, len(rows), batch)]
        if self._cache is not None or workers <= 0 or len(batches) <= 1:
            for rows in batches:
                yield np.asarray(rows), self.batch(rows, pin_memory)
            return
        loader = self._loader_for(workers, pin_memory)
        self._sampler.batches = batches
        for rows, images, error in loader:  # the loader hands numpy rows back as tensors
            if error is not None:
                raise CryoforumError(error["message"], path=error["path"], row=error["row"], fix=error["fix"])
            yield rows.numpy(), images

    def _loader_for(self, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
        """The loader of ``workers`` persistent processes (``persistent_workers``), made on first use and again
        only when ``workers`` or ``pin_memory`` change; its sampler is ``self._sampler``."""
        loader = self._loader
        if loader is None or loader.num_workers != workers or loader.pin_memory != pin_memory:
            loader = self._loader = torch.utils.data.DataLoader(
                _RowBatches(self.ps.image_path, self.ps.image_index, self.ps.image_sign), batch_size=None,
                sampler=self._sampler, num_workers=workers, pin_memory=pin_memory, prefetch_factor=2,
                persistent_workers=True,
                generator=torch.Generator())  # its own seed source: the global RNG (dropout, ...) is left untouched
        return loader

    def close(self) -> None:
        """Close the files and end the loader processes."""
        self.reader.close()
        self._loader = None  # its iterator ends the processes when released


def split_rows(n: int, val_fraction: float, test_fraction: float, seed: int, quat=None,
               stratify: bool = False) -> dict[str, np.ndarray]:
    """Row indices for 'train', 'val', 'test'. ``stratify``: each orientation bin (octant of the viewing direction
    × 2 tilt bands) is split in the same proportions, so every split covers the sphere."""
    rng = np.random.default_rng(seed)
    if stratify and quat is not None:
        d = rotations.viewing_direction(quat)
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
