"""Images and maps through mrcfile: stacks read image by image (positional reads, a bounded number of open files),
maps, atomic writes."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from cryoforum_plugin.formats.atomic import atomic_path
from cryoforum_plugin.errors import CryoforumError


def _open(path, header_only: bool = False, what: str = "stack"):
    """The MRC file at ``path`` (memory-mapped, or its header only); one clear error when it is missing or not MRC,
    worded for ``what`` it is: an image "stack" (named by a particle file) or a "map"."""
    try:
        if header_only:
            return mrcfile.open(str(path), mode="r", permissive=True, header_only=True)
        return mrcfile.mmap(str(path), mode="r", permissive=True)
    except FileNotFoundError:
        if what == "map":
            raise CryoforumError("map not found.", path=path, fix="check the map's path (.mrc).") from None
        raise CryoforumError("image stack not found.", path=path,
                             fix="check the image names in the particle file and the project directory.") from None
    except (ValueError, OSError) as exc:
        kind = "a 3-D map (.mrc)" if what == "map" else "an MRC image stack (.mrcs/.mrc)"
        raise CryoforumError(f"cannot read as MRC ({exc}).", path=path, fix=f"the file must be {kind}.") from None


def stack_shape(path) -> tuple[int, int, int]:
    """(n_images, ny, nx) of an MRC stack, from its header (checked against the file size)."""
    stack = _Stack(str(path))
    stack.close()
    return stack.shape


class _Stack:
    """An open MRC stack read with positional reads: the header says where the images are and how they are
    stored; ``read(indices)`` fetches only those images."""

    def __init__(self, path: str):
        with _open(path, header_only=True) as mrc:
            header = mrc.header
            self.dtype = mrcfile.utils.data_dtype_from_header(header)
            shape = mrcfile.utils.data_shape_from_header(header)
            self.offset = header.nbytes + int(header.nsymbt)
        self.shape = (1, *shape) if len(shape) == 2 else tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise CryoforumError(f"expected an image stack, found a {len(self.shape)}-D array.", path=path,
                                 fix="particle images must be a 2-D image or a stack (.mrcs).")
        self.image_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)
        available = (os.fstat(self.fd).st_size - self.offset) // max(self.image_bytes, 1)
        if available < self.shape[0]:
            os.close(self.fd)
            raise CryoforumError(f"the file is truncated: the header announces {self.shape[0]} images, the file "
                                 f"holds {available}.", path=path, fix="re-extract or re-copy the stack.")

    def read(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Images at sorted ``indices`` into ``out`` (len(indices), ny, nx) float32; one read per run of
        consecutive indices."""
        breaks = np.nonzero(np.diff(indices) != 1)[0] + 1
        for run_start, run_stop in zip(np.r_[0, breaks], np.r_[breaks, len(indices)]):
            first, count = int(indices[run_start]), int(run_stop - run_start)
            raw = os.pread(self.fd, count * self.image_bytes, self.offset + first * self.image_bytes)
            out[run_start:run_stop] = np.frombuffer(raw, self.dtype).reshape(count, *self.shape[1:])

    def close(self) -> None:
        os.close(self.fd)


class StackReader:
    """Reads particle images from many MRC stacks, keeping at most ``max_open`` files open (LRU).

    Only the requested images are read, with positional reads (no memory map: the process never holds a stack's
    pages, so its memory stays flat however large the stacks are); int8, int16, uint16 and float16 stacks are
    returned as float32. Safe to use in forked worker processes.
    """

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self._stacks: collections.OrderedDict[str, _Stack] = collections.OrderedDict()

    def _get(self, path: str) -> _Stack:
        stack = self._stacks.pop(path, None)
        if stack is None:
            stack = _Stack(path)
            while len(self._stacks) >= self.max_open:
                self._stacks.popitem(last=False)[1].close()
        self._stacks[path] = stack
        return stack

    @property
    def n_open(self) -> int:
        return len(self._stacks)

    def read(self, paths, indices) -> np.ndarray:
        """Images for (B,) stack paths and (B,) 0-based indices -> (B, ny, nx) float32, in the given order."""
        paths = np.asarray(paths)
        indices = np.asarray(indices, dtype=np.int64)
        out = None
        for path in dict.fromkeys(paths.tolist()):
            sel = np.nonzero(paths == path)[0]
            stack = self._get(path)
            idx = indices[sel]
            if idx.min() < 0 or idx.max() >= stack.shape[0]:
                bad = int(sel[np.argmax((idx < 0) | (idx >= stack.shape[0]))])
                raise CryoforumError(f"image index {int(indices[bad]) + 1} is past the end of a stack of "
                                     f"{stack.shape[0]} images.", path=path,
                                     fix="check rlnImageName / blob/idx against the stack.")
            if out is None:
                out = np.empty((len(paths), *stack.shape[1:]), dtype=np.float32)
            elif out.shape[1:] != stack.shape[1:]:
                raise CryoforumError(f"images of {stack.shape[2]} px among images of {out.shape[2]} px.",
                                     path=path, fix="all particles of a job must share one box size.")
            order = np.argsort(idx, kind="stable")
            part = np.empty((len(sel), *stack.shape[1:]), dtype=np.float32)
            stack.read(idx[order], part)
            out[sel[order]] = part
        return out if out is not None else np.empty((0, 0, 0), np.float32)

    def close(self) -> None:
        while self._stacks:
            self._stacks.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_map(path) -> tuple[np.ndarray, float]:
    """A 3-D map -> (volume (z, y, x) float32, pixel size Å). Non-cubic or odd maps are zero-padded to an even cube
    n³ around their centre voxel: the voxel at s // 2 of each axis (the FFT centre, RELION's convention) lands at
    n // 2, as fourier.pad_real places it."""
    with _open(path, what="map") as mrc:
        vol = np.asarray(mrc.data, dtype=np.float32)
        voxel = float(mrc.voxel_size.x)
    if vol.ndim != 3:
        raise CryoforumError(f"expected a 3-D map, found shape {vol.shape}.", path=path, fix="pass a 3-D .mrc map.")
    if len(set(vol.shape)) > 1 or vol.shape[0] % 2:
        n = max(vol.shape) + max(vol.shape) % 2  # an even cube: the centre is at index n // 2
        cube = np.zeros((n, n, n), np.float32)
        sl = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for s in vol.shape)
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
