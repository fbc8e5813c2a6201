"""Noise of real particles: its radial power spectrum (level and colour) and the signal's, for simulators that
must look like the data (training from the consensus map, realistic benchmarks), plus coloured Gaussian noise.

Spectrum convention (everywhere in this module): per Fourier shell ``k = round(|(kx, ky)|)``, ``k = 0 ... box//2``
(``box//2 + 1`` values), ``S[k] = E|fft2c(x)[k]|² / box²`` in the images' own units (pixel value²). With this
normalisation white noise of per-pixel variance σ² has ``S = σ²`` in every shell, the per-pixel variance of noise
with spectrum ``S`` is the mean of ``S`` over the box's Fourier grid (Parseval), and ``whitening_filter()`` turns
noise of spectrum ``S`` into white noise of unit variance. The corners of the grid beyond ``box//2`` are left out of
the estimates and take the last shell's value when a spectrum is laid out on the grid.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from cryoforum_plugin.physics.fourier import as_tensor, fft2c, grid_2d, ifft2c, radius_2d


def n_shells(box: int) -> int:
    return box // 2 + 1


def shell_index(box: int, device=None) -> torch.Tensor:
    """(box, box) long tensor: the shell of every centred Fourier pixel (may exceed box//2 in the corners)."""
    return torch.round(radius_2d(box, device)).long()


def shell_means(values: torch.Tensor) -> torch.Tensor:
    """(B, N, N) values on a centred grid -> (B, K) per-image means over the rings k = round(radius) (K = N//2 + 1;
    the corners beyond N//2 left out), float64."""
    n = values.shape[-1]
    k = n_shells(n)
    idx = shell_index(n, values.device).reshape(-1)
    keep = idx < k
    flat = values.reshape(values.shape[0], -1)[:, keep].to(torch.float64)
    sums = torch.zeros(values.shape[0], k, dtype=torch.float64, device=values.device).index_add_(1, idx[keep], flat)
    return sums / torch.bincount(idx[keep], minlength=k).to(torch.float64)


def radial_power(images: torch.Tensor) -> torch.Tensor:
    """(B, N, N) real images -> (K,) shell means of |fft2c|²/N², averaged over the batch (float64)."""
    n = images.shape[-1]
    power = (fft2c(images.to(torch.float32)).abs() ** 2).sum(0).to(torch.float64) / n**2  # sum over the batch
    return shell_means(power[None])[0] / max(images.shape[0], 1)


def spectrum_2d(spectrum, box: int, device=None) -> torch.Tensor:
    """(..., K) per-shell values -> (..., box, box) centred grids (corners take the last shell's value)."""
    s = as_tensor(np.asarray(spectrum, dtype=np.float64) if not isinstance(spectrum, torch.Tensor) else spectrum,
                  device)
    idx = shell_index(box, s.device).clamp(max=s.shape[-1] - 1)
    return s[..., idx]


def coloured_noise(n: int, box: int, spectrum, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, box, box) Gaussian noise whose radial power spectrum is ``spectrum`` (K,) (module convention):
    white unit-variance noise filtered by sqrt(spectrum) per shell in Fourier space. The white noise is drawn on
    the generator's device (so a seeded generator gives the same noise whatever ``device``) and moved."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    white = torch.randn((n, box, box), generator=generator, device=gen_device).to(device)
    amp = spectrum_2d(spectrum, box, white.device).clamp(min=0).sqrt()
    return ifft2c(fft2c(white) * amp).real


def whitening_filter(spectrum, box: int, device=None) -> torch.Tensor:
    """(..., box, box) centred 1/sqrt(S) of (..., box//2 + 1) per-shell spectra S (module convention, image
    units²): multiplying fft2c(images) by it turns noise of spectrum S into white noise of unit variance. Pixels
    with (near) zero power are capped at 1e-6 × their spectrum's mean over the grid."""
    s = spectrum_2d(spectrum, box, device)
    return torch.maximum(s, 1e-6 * s.mean((-2, -1), keepdim=True) + 1e-30).rsqrt()


def whiten(images: torch.Tensor, spectrum) -> torch.Tensor:
    """(B, N, N) real images -> (B, N, N) float32: every Fourier component divided by the noise amplitude
    sqrt(S[k]) of its shell (``whitening_filter``), S = ``spectrum`` ((N//2 + 1,) array or tensor, module
    convention; or (B, N//2 + 1): one spectrum per image). Noise of spectrum S comes out white with unit
    variance; with S normalised to unit mean over the grid (``relative_spectrum``) the noise keeps its per-pixel
    variance and a flat S leaves the images unchanged."""
    w = whitening_filter(spectrum, images.shape[-1], images.device)
    return ifft2c(fft2c(images.to(torch.float32)) * w).real


def spectrum_colour(spectrum) -> float:
    """How far a (K,) per-shell noise spectrum is from white: its largest over its smallest shell, shells
    1 ... K-1 (shell 0, the images' mean, left out); 1 for white noise."""
    s = np.asarray(spectrum, dtype=np.float64).reshape(-1)[1:]
    return float(s.max() / max(s.min(), 1e-30 * max(s.max(), 1e-30)))


@dataclasses.dataclass
class NoiseModel:
    """Radial noise and signal power spectra (K = box//2 + 1 shells, module convention) of a particle set.

    ``snr``: mean variance of the clean CTF-modulated images / noise variance (simulation.py's definition; NaN
    when unknown, e.g. from the background alone). ``pixel_size``: Å of the images the spectra describe.
    """

    spectrum: np.ndarray
    signal_spectrum: np.ndarray
    snr: float
    pixel_size: float
    box: int

    def __post_init__(self):
        self.spectrum = np.asarray(self.spectrum, dtype=np.float64).reshape(-1)
        self.signal_spectrum = np.asarray(self.signal_spectrum, dtype=np.float64).reshape(-1)
        self.snr, self.pixel_size, self.box = float(self.snr), float(self.pixel_size), int(self.box)
        if len(self.spectrum) != n_shells(self.box) or len(self.signal_spectrum) != n_shells(self.box):
            raise ValueError(f"a {self.box}-px NoiseModel needs {n_shells(self.box)} shells, got "
                             f"{len(self.spectrum)} and {len(self.signal_spectrum)}")

    @property
    def noise_variance(self) -> float:
        """Per-pixel variance of noise with this spectrum (mean of the spectrum over the Fourier grid)."""
        return float(spectrum_2d(self.spectrum, self.box).double().mean())

    def spectrum_2d(self, device=None) -> torch.Tensor:
        return spectrum_2d(self.spectrum, self.box, device)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n, box, box) float32 coloured Gaussian noise with this spectrum."""
        return coloured_noise(n, self.box, self.spectrum, generator, device)

    def whitening_filter(self, device=None) -> torch.Tensor:
        """(box, box) centred 1/sqrt(spectrum) (module function ``whitening_filter``): multiply fft2c(images) by it
        to whiten the noise (unit variance)."""
        return whitening_filter(self.spectrum, self.box, device)

    def resampled(self, box: int, pixel_size: float) -> "NoiseModel":
        """The same noise described on another grid (box px at pixel_size Å): spectra interpolated at the same
        spatial frequencies and scaled by (old / new pixel size)², as Fourier cropping (resample.resample) does.
        Frequencies past the old Nyquist take the last shell's value."""
        if box == self.box and abs(pixel_size - self.pixel_size) < 1e-9 * self.pixel_size:
            return self
        k_new = np.arange(n_shells(box)) / (box * pixel_size)  # 1/Å
        k_old = np.arange(n_shells(self.box)) / (self.box * self.pixel_size)
        f = (self.pixel_size / pixel_size) ** 2

        def tr(s):
            return np.interp(k_new, k_old, s) * f

        return NoiseModel(tr(self.spectrum), tr(self.signal_spectrum), self.snr, pixel_size, box)

    def to_dict(self) -> dict:
        """JSON-able dict (NaN SNR as None)."""
        return {"box": self.box, "pixel_size": self.pixel_size,
                "snr": None if not math.isfinite(self.snr) else self.snr,
                "spectrum": [float(v) for v in self.spectrum],
                "signal_spectrum": [float(v) for v in self.signal_spectrum]}

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseModel":
        snr = d.get("snr")
        return cls(np.asarray(d["spectrum"]), np.asarray(d["signal_spectrum"]),
                   float("nan") if snr is None else float(snr), float(d["pixel_size"]), int(d["box"]))


def estimate_noise_spectrum(ps, reference_map, *, batch: int = 256, max_particles: int = 2000, device=None,
                            map_pixel_size: float | None = None, images=None, seed: int = 0) -> NoiseModel:
    """Noise and signal spectra of particles with poses, from residuals against a reference map.

    For each particle (up to ``max_particles``, chosen at random with ``seed`` among those with a pose): the
    CTF-modulated projection ``P`` of ``reference_map`` at its pose and shift, the least-squares amplitude
    ``a = <X, P> / <P, P>`` (maps and images have arbitrary scales and signs), and the residual ``X - a·P``. The
    noise spectrum is the mean radial power of the residuals, the signal spectrum that of ``a·P``, and ``snr`` the
    mean variance of ``a·P`` over the mean residual variance (simulation.py's definition).

    ``reference_map``: (D, D, D) array/tensor or a map path. Without ``map_pixel_size`` (or a path's header) it is
    taken to span the particle box (Fourier-resized to it); with it, it is resampled to the particles' pixel size
    and padded/cropped. ``images``: optional (N, box, box) array/tensor aligned with ``ps`` (skips the stacks).
    Particles must share one box and pixel size (``ParticleSet.require_one_sampling``: one clear error otherwise).
    """
    from cryoforum_plugin.physics.ctf import ctf_images
    from cryoforum_plugin.physics.resample import map_on_particle_grid
    from cryoforum_plugin.physics.projector import Projector

    device = torch.device(device) if device is not None else torch.device("cpu")
    apix, box = ps.require_one_sampling("the noise estimate")
    rows = np.nonzero(np.asarray(ps.has_poses))[0]
    if len(rows) == 0:
        raise ValueError("estimate_noise_spectrum needs particles with poses")
    if len(rows) > max_particles:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_particles, replace=False))
    projector = Projector(map_on_particle_grid(reference_map, box, apix, map_pixel_size, device), device=device)
    reader = None
    if images is None:
        from cryoforum_plugin.formats.mrc import StackReader

        reader = StackReader()
    k = n_shells(box)
    noise_pow = torch.zeros(k, dtype=torch.float64, device=device)
    signal_pow = torch.zeros(k, dtype=torch.float64, device=device)
    noise_var = signal_var = 0.0
    try:
        for lo in range(0, len(rows), batch):
            r = rows[lo:lo + batch]
            if images is None:
                x = torch.from_numpy(ps.read_images(reader, r)).to(device)
            else:
                x = as_tensor(images[torch.as_tensor(r)] if isinstance(images, torch.Tensor) else images[r], device)
            c = None if ps.ctf is None else ctf_images(ps.ctf, r, box, ps.pixel_size[r], device)
            p = projector.project(ps.quat[r], as_tensor(ps.shift_A[r] / ps.pixel_size[r, None], device), c)
            a = (x * p).sum((-2, -1)) / (p * p).sum((-2, -1)).clamp(min=1e-30)
            sig = a[:, None, None] * p
            res = x - sig
            noise_pow += radial_power(res) * len(r)
            signal_pow += radial_power(sig) * len(r)
            noise_var += float(res.double().var(dim=(-2, -1)).sum())
            signal_var += float(sig.double().var(dim=(-2, -1)).sum())
    finally:
        if reader is not None:
            reader.close()
    n = len(rows)
    return NoiseModel((noise_pow / n).cpu().numpy(), (signal_pow / n).cpu().numpy(),
                      signal_var / max(noise_var, 1e-30), apix, box)


def background_noise_spectrum(images, radius: float, *, batch: int = 256, width: float = 3.0) -> np.ndarray:
    """Pose-free noise spectrum (K,) (module convention) from the region outside a circle of ``radius`` px.

    Each image minus the mean of its background is multiplied by a mask that is 0 inside ``radius`` and rises to 1
    over ``width`` px (cosine edge); the radial power is divided by the mask's mean square. Approximate: the mask
    blurs the spectrum over a few shells (worst at the lowest frequencies) and any signal outside the circle
    counts as noise. Shell 0 (the mean, removed per image) is copied from shell 1. ``images``: (B, N, N) array or
    tensor.
    """
    x_all = images
    n = x_all.shape[-1]
    device = x_all.device if isinstance(x_all, torch.Tensor) else None
    r = radius_2d(n, device)
    t = ((r - radius) / max(width, 1e-6)).clamp(0, 1)
    mask = 0.5 - 0.5 * torch.cos(np.pi * t)
    norm = float((mask**2).mean())
    if norm <= 0:
        raise ValueError(f"no background outside a radius of {radius} px in a {n}-px box")
    total = torch.zeros(n_shells(n), dtype=torch.float64, device=device)
    count = 0
    for lo in range(0, x_all.shape[0], batch):
        x = as_tensor(x_all[lo:lo + batch], device)
        mean = (x * mask).sum((-2, -1), keepdim=True) / mask.sum()
        total += radial_power((x - mean) * mask) * x.shape[0]
        count += x.shape[0]
    out = (total / max(count, 1) / norm).cpu().numpy()
    out[0] = out[1]  # the background mean was removed: the DC shell takes its neighbour's value
    return out


def relative_spectrum(noise_spectrum, box: int, pixel_size: float) -> np.ndarray:
    """Per-shell relative power (K,) normalised to unit per-pixel variance, from what ``simulate(noise_spectrum=)``
    accepts: a (K,) array of per-shell power, a callable of spatial frequency (1/Å, array) giving relative power,
    or a NoiseModel (resampled to ``box`` px at ``pixel_size`` Å)."""
    if isinstance(noise_spectrum, NoiseModel):
        s = noise_spectrum.resampled(box, pixel_size).spectrum
    elif callable(noise_spectrum):
        s = np.asarray(noise_spectrum(np.arange(n_shells(box)) / (box * pixel_size)), dtype=np.float64)
    else:
        s = np.asarray(noise_spectrum, dtype=np.float64).reshape(-1)
    if s.shape != (n_shells(box),) or not np.all(np.isfinite(s)) or (s < 0).any() or s.max() <= 0:
        raise ValueError(f"a noise spectrum for a {box}-px box needs {n_shells(box)} finite non-negative values")
    return s / float(spectrum_2d(s, box).double().mean())


def lorentzian_with_bump(k0: float = 1 / 40, bump_at: float = 1 / 12, bump_width: float = 1 / 80,
                         bump_height: float = 0.6, floor: float = 0.05):
    """A noise colour unlike white, for realistic benchmarks (``simulate(noise_spectrum=...)``): relative power
    ``1/(1 + (s/k0)²) + floor + bump_height·exp(-(s - bump_at)²/(2·bump_width²))`` of spatial frequency s (1/Å)."""

    def shape(s):
        s = np.asarray(s, dtype=np.float64)
        return 1 / (1 + (s / k0) ** 2) + floor + bump_height * np.exp(-((s - bump_at) ** 2) / (2 * bump_width**2))

    return shape


def relion_bg_radius(box: int) -> float:
    """RELION's default background radius (px) when none is given: the extraction job's background circle of 75 %
    of the box's diameter."""
    return 0.375 * box


def relion_normalise(images: torch.Tensor, bg_radius_px: float, ramp: bool = True) -> torch.Tensor:
    """(B, N, N) images normalised as ``relion_preprocess --norm --bg_radius R`` does: the background (pixels
    farther than ``bg_radius_px`` from the centre) to mean 0 and standard deviation 1.

    With ``ramp`` (RELION's default; ``--no_ramp`` turns it off) a plane a + b·x + c·y fitted to the background by
    least squares is subtracted from the whole image first; without, the background mean. Each image is then
    divided by its background's standard deviation, so the signal-to-noise ratio of a particle varies with its
    micrograph's noise level and ice as it does in real data.
    """
    x = images.to(torch.float64)
    n = x.shape[-1]
    bg = radius_2d(n, x.device) > bg_radius_px
    if int(bg.sum()) < 4:
        raise ValueError(f"no background outside a radius of {bg_radius_px} px in a {n}-px box")
    ky, kx = grid_2d(n, x.device)
    design = torch.stack([torch.ones_like(kx), kx, ky], -1).to(torch.float64)  # (N, N, 3)
    if not ramp:
        design = design[..., :1]
    coef = torch.linalg.lstsq(design[bg], x[:, bg].T).solution  # (3, B)
    x = x - torch.einsum("yxk,kb->byx", design, coef)
    values = x[:, bg]
    x = (x - values.mean(1)[:, None, None]) / values.std(1, correction=0).clamp(min=1e-30)[:, None, None]
    return x.to(images.dtype)
