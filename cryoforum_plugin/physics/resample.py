"""The one resampler: images and maps to another pixel size and box (Fourier cropping or padding, then real-space
cropping or padding). ``map_on_particle_grid`` brings a map onto the particles' grid (refinement, the noise
estimate, training from the map); ``nn.preprocess.to_model_grid`` brings each optics group's images onto the
model's grid; ``resized_map`` reads a map at another box (the simulator, tests and benchmarks)."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.fourier import as_tensor, fft2c, fft3c, ifft2c, ifft3c, pad_real


def resample(x: torch.Tensor, box: int, dims: int, fourier_box: int | None = None) -> torch.Tensor:
    """The last ``dims`` (2: images, 3: a volume) axes of ``x`` (..., N, N[, N]) -> (..., box, box[, box]):
    Fourier-cropped or padded to ``fourier_box`` (the pixel size scales by N / fourier_box; real-space values
    preserved), then cropped or zero-padded in real space around the centre to ``box``. ``fourier_box=None``:
    ``box`` (the same field of view at a new pixel size)."""
    n = x.shape[-1]
    m = box if fourier_box is None else fourier_box
    if m != n:
        fft, ifft = (fft2c, ifft2c) if dims == 2 else (fft3c, ifft3c)
        x = ifft(pad_real(fft(x), m, dims)).real * (m / n) ** dims
    return pad_real(x, box, dims)


def resized_map(path, box: int, device=None) -> tuple[torch.Tensor, float]:
    """The map in ``path`` Fourier-cropped/padded to ``box``³ and its new pixel size (Å)."""
    from cryoforum_plugin.formats.mrc import read_map

    vol, apix = read_map(path)
    return resample(as_tensor(vol, device), box, 3), apix * vol.shape[0] / box


def map_on_particle_grid(reference, box: int, pixel_size: float, map_pixel_size: float | None = None,
                         device=None, path=None, what: str = "map") -> torch.Tensor:
    """(box, box, box) float tensor on ``device``: ``reference`` (a map path, or a (D, D, D) array/tensor)
    Fourier-resized to ``pixel_size`` Å/px and zero-padded or cropped to ``box``.

    ``map_pixel_size``: the map's Å/px (a path's header gives it when None). An array without one is taken to span
    the particle box (resized to ``box``). A map whose resampling to ``pixel_size`` needs a box that is not a whole
    number (scale error > 1/4 px at the particles' Nyquist) is one clear error, as are non-cubic and non-finite
    maps; ``path`` names the file and ``what`` the map ("map", "reference") in those messages."""
    vol = reference
    if not isinstance(vol, (np.ndarray, torch.Tensor)):
        from cryoforum_plugin.formats.mrc import read_map

        path = vol
        vol, header_apix = read_map(vol)
        map_pixel_size = header_apix if map_pixel_size is None else map_pixel_size
    v = vol.detach().cpu().numpy() if isinstance(vol, torch.Tensor) else np.asarray(vol)
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise CryoforumError(f"the {what} must be a cubic 3-D map, got shape {v.shape}.", path=path,
                             fix="pass a (D, D, D) map (pad it to a cube).")
    if not np.isfinite(v).all():
        raise CryoforumError(f"the {what} contains NaN or infinite values.", path=path, fix="pass a finite map.")
    t = as_tensor(v, device)
    d = v.shape[0]
    if map_pixel_size is None:  # the same physical extent as the particle box
        return resample(t, box, 3).contiguous()
    if not np.isfinite(map_pixel_size) or map_pixel_size <= 0:
        raise CryoforumError(f"invalid {what} pixel size {map_pixel_size}.", path=path,
                             fix="give the map's pixel size in Å (its header, or reference_pixel_size).")
    n_new = d * map_pixel_size / pixel_size
    m = round(n_new)
    tol = 0.25 / (box / 2)  # ≤ 1/4 px of scale error at the particles' Nyquist
    if m < 8 or abs(d * map_pixel_size / m - pixel_size) / pixel_size > tol:
        raise CryoforumError(
            f"the {what} ({d} px at {map_pixel_size:g} Å/px) cannot be resampled to the particles' pixel size "
            f"{pixel_size:g} Å: that needs a box of {n_new:.2f} px, not a whole number (pixel-size mismatch "
            f"{abs(d * map_pixel_size / max(m, 1) - pixel_size) / pixel_size:.1%} > {tol:.1%}).", path=path,
            fix="resample the map to the particles' pixel size (e.g. relion_image_handler --rescale_angpix "
                f"{pixel_size:g} --new_box {box}), or check the map's pixel size.")
    return resample(t, box, 3, fourier_box=m).contiguous()
