"""Image preprocessing shared by training and prediction (an nn.Module saved with the model).

(B, N, N) raw particle images -> Fourier crop to the training box -> soft circular mask (0.85 -> 0.99 of the
half-box, the paper's window) -> standardisation with statistics measured on the training set -> blurring
layer: the image plus a bank of low-pass (default) or Gaussian filtered copies as channels: (B, C, box, box).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .fourier import radius_2d, resize_images, soft_circular_mask

LOWPASS_FRACTIONS = (0.5, 0.25, 0.125)  # cut-offs as fractions of Nyquist
GAUSSIAN_SIGMAS = (1.0, 2.0, 4.0)  # pixels of the training box


class Preprocess(nn.Module):
    """Raw (B, N, N) images -> network input (B, C, box, box). ``blur``: 'lowpass' | 'gaussian' | 'none'."""

    def __init__(self, box: int = 128, blur: str = "lowpass", mean: float = 0.0, std: float = 1.0):
        super().__init__()
        if blur not in ("lowpass", "gaussian", "none"):
            raise ValueError(f"unknown blurring layer '{blur}'")
        self.box, self.blur = box, blur
        self.register_buffer("mask", soft_circular_mask(box, 0.85, 0.99))
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
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
        return 1 + self.bank.shape[0]

    def crop_and_mask(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, N) -> (B, box, box): Fourier crop (or pad) and soft circular mask, before standardisation."""
        return resize_images(images.float(), self.box) * self.mask

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.crop_and_mask(images) - self.mean) / self.std
        if self.bank.shape[0] == 0:
            return x[:, None]
        # The filters are real and symmetric (H(k) = H(-k)): filtering with the half-plane real FFT and the
        # uncentred bank equals ifft2c(fft2c(x) * bank).real at a third of the cost.
        half = torch.fft.ifftshift(self.bank, dim=(-2, -1))[..., : self.box // 2 + 1]
        filtered = torch.fft.irfft2(torch.fft.rfft2(x)[:, None] * half[None], s=x.shape[-2:])
        return torch.cat([x[:, None], filtered], dim=1)

    def fit(self, images: torch.Tensor) -> None:
        """Set the standardisation statistics from a sample of raw training images (B, N, N)."""
        x = self.crop_and_mask(images)
        self.mean.fill_(float(x.mean()))
        self.std.fill_(float(x.std().clamp_min(1e-8)))


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


def psi_rotation_quats(angles_deg) -> np.ndarray:
    """(B,) angles -> (B, 4) quaternions r with q(psi + a) = r ⊗ q(psi), i.e. r = rotation about z by -a."""
    half = -np.deg2rad(np.asarray(angles_deg, dtype=np.float64)) / 2
    return np.stack([np.cos(half), np.zeros_like(half), np.zeros_like(half), np.sin(half)], -1)
