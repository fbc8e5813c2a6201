"""Images and maps through mrcfile: memory-mapped stacks, a bounded number of open files, atomic writes."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import mrcfile
import numpy as np

from .atomic import atomic_path
from .errors import CryoforumError


def _open(path):
    try:
        return mrcfile.mmap(str(path), mode="r", permissive=True)
    except FileNotFoundError:
        raise CryoforumError("image stack not found.", path=path,
                             fix="check the image names in the particle file and the project directory.") from None
    except (ValueError, OSError) as exc:
        raise CryoforumError(f"cannot read as MRC ({exc}).", path=path,
                             fix="the file must be an MRC image stack (.mrcs/.mrc).") from None


def stack_shape(path) -> tuple[int, int, int]:
    """(n_images, ny, nx) of an MRC stack, from its header only."""
    with _open(path) as mrc:
        data = mrc.data
        if data is None:
            raise CryoforumError("MRC file has no data.", path=path, fix="re-extract the particles.")
        return (1, *data.shape) if data.ndim == 2 else tuple(data.shape)


class StackReader:
    """Reads particle images from many MRC stacks, keeping at most ``max_open`` files open (LRU).

    Images are memory-mapped: only the requested images are read; float16 and int16 stacks are
    returned as float32.
    """

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._handles: collections.OrderedDict[str, mrcfile.mrcfile.MrcFile] = collections.OrderedDict()

    def _get(self, path: str):
        handle = self._handles.pop(path, None)
        if handle is None:
            handle = _open(path)
            if handle.data is None:
                raise CryoforumError("MRC file has no data.", path=path, fix="re-extract the particles.")
            while len(self._handles) >= self.max_open:
                self._handles.popitem(last=False)[1].close()
        self._handles[path] = handle
        return handle

    @property
    def n_open(self) -> int:
        return len(self._handles)

    def read(self, paths, indices) -> np.ndarray:
        """Images for (B,) stack paths and (B,) 0-based indices -> (B, ny, nx) float32, in the given order."""
        paths = np.asarray(paths)
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for path in dict.fromkeys(paths.tolist()):
            sel = np.nonzero(paths == path)[0]
            data = self._get(path).data
            stack = data[None] if data.ndim == 2 else data
            idx = indices[sel]
            if idx.min() < 0 or idx.max() >= stack.shape[0]:
                bad = int(sel[np.argmax((idx < 0) | (idx >= stack.shape[0]))])
                raise CryoforumError(f"image index {int(indices[bad]) + 1} is past the end of a stack of "
                                     f"{stack.shape[0]} images.", path=path,
                                     fix="check rlnImageName / blob/idx against the stack.")
            if out is None:
                out = np.empty((len(paths), *stack.shape[1:]), dtype=np.float32)
            order = np.argsort(idx)  # sequential reads from the memory map
            out[sel[order]] = stack[idx[order]]
        return out if out is not None else np.empty((0, 0, 0), np.float32)

    def close(self) -> None:
        while self._handles:
            self._handles.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_map(path) -> tuple[np.ndarray, float]:
    """A 3-D map -> (volume (z, y, x) float32, pixel size Å). Non-cubic or odd maps are zero-padded to an even cube."""
    with _open(path) as mrc:
        vol = np.asarray(mrc.data, dtype=np.float32)
        voxel = float(mrc.voxel_size.x)
    if vol.ndim != 3:
        raise CryoforumError(f"expected a 3-D map, found shape {vol.shape}.", path=path, fix="pass a 3-D .mrc map.")
    if len(set(vol.shape)) > 1 or vol.shape[0] % 2:
        n = max(vol.shape) + max(vol.shape) % 2  # an even cube: the centre is at index n // 2
        cube = np.zeros((n, n, n), np.float32)
        sl = tuple(slice((n - s) // 2, (n - s) // 2 + s) for s in vol.shape)
        cube[sl] = vol
        vol = cube
    if voxel <= 0:
        raise CryoforumError("the map header has no pixel size.", path=path,
                             fix="set the voxel size in the header (e.g. relion_image_handler --angpix).")
    return vol, voxel


def write_mrc(path, data: np.ndarray, pixel_size: float) -> None:
    """Write a map or an image stack atomically as float32 MRC with the given pixel size (Å)."""
    with atomic_path(path) as tmp:
        with mrcfile.new(str(tmp), overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            mrc.voxel_size = pixel_size
            if data.ndim == 3 and Path(path).suffix == ".mrcs":
                mrc.set_image_stack()


class StackWriter:
    """Appends images to a new MRC stack in chunks; renamed into place on ``close``.

    The header is written by mrcfile; the data go through ordinary file writes (not a writable memory map), so the
    process never holds the stack's pages: memory stays flat whatever the particle count.
    """

    HEADER_BYTES = 1024

    def __init__(self, path, n_images: int, box: int, pixel_size: float):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        with mrcfile.new_mmap(str(self._tmp), shape=(n_images, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size
            assert mrc.header.nsymbt == 0
        self._fh = open(self._tmp, "r+b")
        self._pos, self._box = 0, box
        self._min, self._max, self._sum, self._sumsq, self._count = np.inf, -np.inf, 0.0, 0.0, 0

    def write(self, images: np.ndarray) -> None:
        data = np.ascontiguousarray(images, dtype="<f4")
        self._fh.seek(self.HEADER_BYTES + self._pos * self._box * self._box * 4)
        self._fh.write(data.tobytes())
        self._pos += len(data)
        self._min, self._max = min(self._min, float(data.min())), max(self._max, float(data.max()))
        self._sum += float(data.sum(dtype=np.float64))
        self._sumsq += float((data.astype(np.float64) ** 2).sum())
        self._count += data.size

    def close(self) -> None:
        self._fh.close()
        with mrcfile.mmap(str(self._tmp), mode="r+") as mrc:  # header only: the data pages are not touched
            mean = self._sum / max(self._count, 1)
            mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = self._min, self._max, mean
            mrc.header.rms = np.sqrt(max(self._sumsq / max(self._count, 1) - mean**2, 0.0))
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)
