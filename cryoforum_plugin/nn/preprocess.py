"""Image preprocessing shared by training and prediction (an nn.Module saved with the model).

(B, N, N) raw particle images -> Fourier crop to the training box -> whitening (--whiten: each Fourier component
divided by the noise amplitude of its shell, the spectrum estimated on the training particles and stored in the
module's state, so prediction applies exactly the training's filter unless ``predict --rewhiten`` passes spectra
re-estimated from the new particles (``noise_colour``); off: nothing) -> soft circular mask (0.85 ->
0.99 of the half-box, the paper's window) -> standardisation with statistics measured on the training set ->
blurring layer: the image plus a bank of low-pass (default) or Gaussian filtered copies as channels:
(B, C, box, box).
With ``phase_flip`` a last channel holds the phase-flipped image (``phase_flipped``: the raw image with its
Fourier components multiplied by the sign of its CTF), cropped, masked and standardised like the image; the caller
computes it on the raw grid (before any in-plane rotation, which it then applies to both) and passes it as
``flipped``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fourier import fft2c, ifft2c, radius_2d, shift_phase, soft_circular_mask
from cryoforum_plugin.physics.noise import (
    background_noise_spectrum, relative_spectrum, relion_bg_radius, spectrum_colour, whiten,
)
from cryoforum_plugin.physics.resample import resample

LOWPASS_FRACTIONS = (0.5, 0.25, 0.125)  # cut-offs as fractions of Nyquist
GAUSSIAN_SIGMAS = (1.0, 2.0, 4.0)  # pixels of the training box
COLOURED = 2.0  # --whiten auto whitens when the estimated spectrum's largest / smallest shell exceeds this


class Preprocess(nn.Module):
    """Raw (B, N, N) images -> network input (B, C, box, box). ``blur``: 'lowpass' | 'gaussian' | 'none'."""

    def __init__(self, box: int = 128, blur: str = "lowpass", mean: float = 0.0, std: float = 1.0,
                 phase_flip: bool = False):
        super().__init__()
        if blur not in ("lowpass", "gaussian", "none"):
            raise ValueError(f"unknown blurring layer '{blur}'")
        self.box, self.blur, self.phase_flip = box, blur, bool(phase_flip)
        self.register_buffer("mask", soft_circular_mask(box, 0.85, 0.99))
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        # (box//2 + 1,) relative noise spectrum (unit mean over the grid) the images are whitened by; empty: none
        self.register_buffer("noise_spectrum", torch.zeros(0))
        r = radius_2d(box) / (box / 2)  # fraction of Nyquist
        if blur == "lowpass":  # soft-edged low-pass filters (raised cosine over 10 % of the cut-off)
            bank = [(0.5 + 0.5 * torch.cos(np.pi * ((r - f) / (0.1 * f)).clamp(0, 1))) for f in LOWPASS_FRACTIONS]
        elif blur == "gaussian":  # Fourier transform of a real-space Gaussian of sigma s pixels
            k = radius_2d(box) / box
            bank = [torch.exp(-2 * (np.pi * s * k) ** 2) for s in GAUSSIAN_SIGMAS]
        else:
            bank = []
        self.register_buffer("bank", torch.stack(bank) if bank else torch.zeros(0, box, box))

    @property
    def channels(self) -> int:
        return 1 + self.bank.shape[0] + int(self.phase_flip)

    @property
    def whitens(self) -> bool:
        """Whether the images are whitened (a noise spectrum is stored)."""
        return self.noise_spectrum.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The stored noise spectrum's size varies (empty: no whitening); models saved before it existed load
        without whitening."""
        key = prefix + "noise_spectrum"
        state_dict.setdefault(key, torch.zeros(0))
        self.noise_spectrum = torch.empty_like(state_dict[key], device=self.mask.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def crop_and_mask(self, images: torch.Tensor, spectrum: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, N) -> (B, box, box): Fourier crop (or pad), whitening when a spectrum is stored, and soft
        circular mask, before standardisation. ``spectrum``: (box//2 + 1,) or (B, box//2 + 1) relative spectra
        whitened by instead of the stored one (predict --rewhiten); None: the stored one."""
        x = resample(images.float(), self.box, 2)
        if spectrum is not None or self.whitens:
            x = whiten(x, self.noise_spectrum if spectrum is None else spectrum)
        return x * self.mask

    def forward(self, images: torch.Tensor, flipped: torch.Tensor | None = None,
                spectrum: torch.Tensor | None = None) -> torch.Tensor:
        """``flipped``: (B, N, N) ``phase_flipped`` images, required when the module was built with phase_flip;
        ``spectrum``: whitening spectra replacing the stored one (``crop_and_mask``)."""
        x = (self.crop_and_mask(images, spectrum) - self.mean) / self.std
        channels = [x[:, None]]
        if self.bank.shape[0]:
            # The filters are real and symmetric (H(k) = H(-k)): filtering with the half-plane real FFT and the
            # uncentred bank equals ifft2c(fft2c(x) * bank).real at a third of the cost.
            half = torch.fft.ifftshift(self.bank, dim=(-2, -1))[..., : self.box // 2 + 1]
            channels.append(torch.fft.irfft2(torch.fft.rfft2(x)[:, None] * half[None], s=x.shape[-2:]))
        if self.phase_flip:
            if flipped is None:
                raise ValueError("this model takes a phase-flipped channel: pass flipped=phase_flipped(...)")
            channels.append(((self.crop_and_mask(flipped, spectrum) - self.mean) / self.std)[:, None])
        return channels[0] if len(channels) == 1 else torch.cat(channels, dim=1)

    def fit(self, images: torch.Tensor, whiten: str = "off") -> dict | None:
        """Set the whitening (``whiten``: 'on', 'off', or 'auto': on when the noise is coloured, see
        ``fit_whitening``) and then the standardisation statistics from a sample of raw training images (B, N, N).
        Returns ``fit_whitening``'s record, None with 'off'."""
        record = None if whiten == "off" else self.fit_whitening(images, whiten == "on")
        x = self.crop_and_mask(images)
        self.mean.fill_(float(x.mean()))
        self.std.fill_(float(x.std().clamp_min(1e-8)))
        return record

    def fit_whitening(self, images: torch.Tensor, force: bool = True) -> dict:
        """Estimate the relative noise spectrum of raw images (B, N, N) at the model box (``noise_colour``) and
        store it when ``force`` or when it is coloured (``spectrum_colour`` > COLOURED); else store none.
        Returns {"applied", "colour", "spectrum" (the relative spectrum, list)}."""
        relative = noise_colour([images], self.box)
        colour = spectrum_colour(relative)
        applied = bool(force or colour > COLOURED)
        device = self.mask.device
        self.noise_spectrum = torch.as_tensor(relative, dtype=torch.float32, device=device) if applied else \
            torch.zeros(0, device=device)
        return {"applied": applied, "colour": round(colour, 3), "spectrum": [round(float(v), 6) for v in relative]}


def noise_colour(chunks, box: int, whose: str = "--whiten: the training particles",
                 fix: str = "train with --whiten off (noise-free or masked particles).") -> np.ndarray:
    """The relative noise spectrum (box//2 + 1,) (unit mean over the grid, ``physics.noise.relative_spectrum``)
    of raw images given as an iterable of (B, N, N) tensors: ``physics.noise.background_noise_spectrum`` outside
    RELION's background circle (``relion_bg_radius``) after the Fourier crop to ``box``, averaged over the
    images. Shells past the images' own Nyquist (a Fourier-padded box) take the last measured shell. What
    --whiten stores at training and predict --rewhiten re-estimates for new particles; ``whose`` and ``fix``
    word the error when there is no noise to measure."""
    total, count, size = 0.0, 0, box
    for images in chunks:
        x = resample(images.float(), box, 2)
        total = total + background_noise_spectrum(x, relion_bg_radius(box)) * len(x)
        count, size = count + len(x), images.shape[-1]
    spectrum = np.asarray(total / max(count, 1), dtype=np.float64).reshape(-1)
    if not (len(spectrum) == box // 2 + 1 and np.all(np.isfinite(spectrum)) and spectrum.max() > 0):
        from cryoforum_plugin.errors import CryoforumError

        raise CryoforumError(f"{whose} have no measurable noise outside the particle circle (radius "
                             f"{relion_bg_radius(box):g} px) to whiten by.", fix=fix)
    measured = min(size, box) // 2 + 1
    spectrum[measured:] = spectrum[measured - 1]
    return relative_spectrum(spectrum, box, 1.0)


def phase_flipped(raw: torch.Tensor, ctf, rows, pixel_size) -> torch.Tensor:
    """(B, N, N) raw images -> the same images with every Fourier component multiplied by the sign of the image's
    CTF (``ctf``: a CTF dict as ParticleSet.ctf or a ``physics.ctf.ctf_table`` on the images' device, ``rows``
    into it, ``pixel_size`` Å of the raw grid, scalar or (B,)). Without a CTF (``ctf`` None) the images are returned unchanged."""
    if ctf is None:
        return raw
    sign = torch.sign(ctf_images(ctf, rows, raw.shape[-1], pixel_size, raw.device))
    return ifft2c(fft2c(raw.float()) * sign).real


def rotate_images(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, W) images in-plane; an image of a pose with psi gives the image at psi + angle
    (conventions.md, measured against relion_project)."""
    a = torch.deg2rad(angles_deg.to(images.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2)
    grid = torch.nn.functional.affine_grid(theta, (images.shape[0], 1, *images.shape[-2:]), align_corners=False)
    return torch.nn.functional.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[:, 0]


def augment(raw: torch.Tensor, target: torch.Tensor, gen: torch.Generator, psi: bool = False,
            shift_px: float = 0.0, also: torch.Tensor | None = None):
    """Exact training augmentations of raw (B, N, N) images with their (B, 4) target quaternions: a random
    in-plane rotation with the matching change of psi (``psi``), and random re-centring by up to ``shift_px``
    pixels (the pose is unchanged). Random numbers come from ``gen`` (CPU) so training stays deterministic; they
    reach the device by asynchronous copies (no wait for the GPU).
    ``also``: (B, N, N) images that get the same transforms (the phase-flipped copies) or None.
    Returns (raw, target, also)."""
    b, device = raw.shape[0], raw.device
    if psi:
        a = torch.rand(b, generator=gen) * 360 - 180
        turn = a.to(device, non_blocking=True)
        raw = rotate_images(raw, turn)
        if also is not None:
            also = rotate_images(also, turn)
        r = torch.as_tensor(rotations.psi_rotation_quats(a.numpy()), dtype=torch.float32).to(device, non_blocking=True)
        target = rotations.quat_mul(r, target)
    if shift_px > 0:
        s = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift_px
        ramp = shift_phase(s.to(device, non_blocking=True), raw.shape[-1])
        raw = ifft2c(fft2c(raw) * ramp).real
        if also is not None:
            also = ifft2c(fft2c(also) * ramp).real
    return raw, target, also


def to_model_grid(raw: torch.Tensor, pixel_size, grid_pixel: float, grid_box: int) -> torch.Tensor:
    """Raw (B, N, N) images with per-image pixel sizes (Å, scalar or (B,)) -> (B, grid_box, grid_box) at
    ``grid_pixel`` Å: each pixel-size group is Fourier-cropped or padded to the grid's pixel size, then cropped
    or padded in real space to the grid's box (the model's field of view). Identity when nothing differs."""
    p = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (raw.shape[0],))
    n = raw.shape[-1]
    if n == grid_box and np.allclose(p, grid_pixel, rtol=1e-4):
        return raw
    out = torch.empty(raw.shape[0], grid_box, grid_box, dtype=torch.float32, device=raw.device)
    for value in np.unique(np.round(p, 6)):
        rows = torch.as_tensor(np.nonzero(np.isclose(p, value, rtol=1e-6))[0]).to(raw.device, non_blocking=True)
        new = int(round(n * value / grid_pixel))
        out[rows] = resample(raw[rows].float(), grid_box, 2, fourier_box=new)
    return out


def check_model_grid(pixel_size, model_pixel: float, path=None) -> None:
    """One clear error when particles cannot be brought to a model's sampling: coarser than the model's
    pixel size after its crop (``model_pixel``), i.e. their Nyquist is coarser than the model's."""
    from cryoforum_plugin.errors import CryoforumError

    p = np.asarray(pixel_size, dtype=np.float64)
    bad = np.nonzero(p > model_pixel * (1 + 1e-3))[0]
    if len(bad):
        raise CryoforumError(f"the particles have {p[bad[0]]:.3f} Å/px but the model works at {model_pixel:.3f} Å/px: "
                             f"their Nyquist ({2 * p[bad[0]]:.2f} Å) is coarser than the model's "
                             f"({2 * model_pixel:.2f} Å).", path=path, row=int(bad[0]),
                             fix="predict particles extracted at a finer pixel size, or train a model with a smaller "
                                 "--box (a coarser model pixel size).")

