"""Fourier-slice projection and direct Fourier back-projection (torch, CPU or GPU).

Convention (conventions.md, verified against relion_project): the image of a pose ``A`` (RELION matrix)
samples the map's transform at ``Aᵀ·(kx, ky, 0)``; a particle with origin ``o`` (pixels, RELION sign)
is the centred projection translated by ``-o``. Both use a 2x zero-padded Fourier grid with trilinear
interpolation, as RELION does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.fourier import (
    as_tensor, fft2c, fft3c, freq_1d, grid_2d, ifft2c, ifft3c, pad_real, radius_3d, shift_phase,
)


def _matrices(quats, device) -> torch.Tensor:
    """(B, 3, 3) float32 matrices on ``device`` of (B, 4) unit quaternions: a tensor's computed where it is (no
    copy from the host), an array's on the host (scipy, float64)."""
    if isinstance(quats, torch.Tensor):
        return rotations.quat_to_matrix_torch(quats.to(device, torch.float64)).float()
    return as_tensor(rotations.quat_to_matrix(np.asarray(quats, dtype=np.float64)), device)



def _gridding(n_pad: int, box: int, device, dims: int) -> torch.Tensor:
    """Real-space sinc² profile of trilinear interpolation on an ``n_pad`` grid, cropped to ``box``."""
    s = torch.sinc(freq_1d(n_pad, device) / n_pad) ** 2
    s = s[n_pad // 2 - box // 2: n_pad // 2 - box // 2 + box]
    if dims == 3:
        return s[:, None, None] * s[None, :, None] * s[None, None, :]
    return s[:, None] * s[None, :]


def _shell_filter(shell_weight, n: int, pad: int, device) -> torch.Tensor:
    """(n, n, n) real filter on a ``pad``-times padded grid from per-shell weights of the unpadded grid (shell i at
    radius i Fourier pixels; linear interpolation between shells, the last weight beyond)."""
    w = torch.as_tensor(np.asarray(shell_weight, dtype=np.float64), dtype=torch.float32, device=device)
    r = radius_3d(n, device) / pad
    i0 = r.floor().long().clamp(max=len(w) - 1)
    i1 = (i0 + 1).clamp(max=len(w) - 1)
    t = (r - r.floor()).clamp(0, 1)
    return (1 - t) * w[i0] + t * w[i1]


class Projector:
    """Projects a (D, D, D) map (z, y, x) at given poses; ``pad`` is the Fourier oversampling factor.
    ``shell_weight``: optional radial filter of the map, one weight per Fourier shell of the unpadded grid."""

    def __init__(self, volume, pad: int = 2, device=None, shell_weight=None):
        vol = as_tensor(volume, device)
        self.box = vol.shape[-1]
        self.pad = pad
        self.n = pad * self.box
        self.device = vol.device
        vol = vol / _gridding(self.n, self.box, vol.device, 3)  # pre-compensate trilinear interpolation
        spec = fft3c(pad_real(vol, self.n, 3))
        if shell_weight is not None:
            spec = spec * _shell_filter(shell_weight, self.n, pad, vol.device)
        self._spec = torch.stack([spec.real, spec.imag])[None]  # (1, 2, n, n, n)
        self._crops: dict[int, torch.Tensor] = {}

    def project(self, quats, shifts_px=None, ctf: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, D, D) for (B, 4) poses, optional (B, 2) origins in pixels and (B, D, D) CTF images."""
        mats = _matrices(quats, self.device)  # (B, 3, 3)
        b, d = mats.shape[0], self.box
        ky, kx = grid_2d(d, self.device)
        k = torch.stack([kx, ky, torch.zeros_like(kx)], -1).reshape(-1, 3) * self.pad  # (d*d, 3) x, y, z
        coords = torch.einsum("bji,pj->bpi", mats, k)  # Aᵀ k, (B, d*d, 3)
        grid = (coords + self.n // 2) / (self.n - 1) * 2 - 1
        sampled = F.grid_sample(self._spec, grid.reshape(1, b, d, d, 3), mode="bilinear",
                                padding_mode="zeros", align_corners=True)[0]  # (2, B, d, d)
        spec = torch.complex(sampled[0], sampled[1])
        if shifts_px is not None:
            spec = spec * shift_phase(as_tensor(shifts_px, self.device), d, +1.0)
        if ctf is not None:
            spec = spec * ctf
        return ifft2c(spec).real

    def _crop(self, radius: float) -> tuple[torch.Tensor, int]:
        """The padded spectrum's central (2m+1)³ cube (1, 2, ...) holding every frequency up to ``radius`` Fourier
        pixels of the unpadded grid, and m. Only the last cube is kept for later calls: a refinement with
        per-particle search radii asks for up to n/2 sizes (n = pad·box), which all kept would take ~n⁴ bytes
        (4 GB at 128 px)."""
        m = min(math.ceil(self.pad * radius) + 2, self.n // 2 - 1)
        if m not in self._crops:
            self._crops.clear()
            c = self.n // 2
            self._crops[m] = self._spec[:, :, c - m:c + m + 1, c - m:c + m + 1, c - m:c + m + 1].contiguous()
        return self._crops[m], m

    def sample_slices(self, mats: torch.Tensor, kvec: torch.Tensor, radius: float,
                      chunk: int = 1 << 21) -> torch.Tensor:
        """Central-slice values of the map's spectrum for (M, 3, 3) matrices ``A`` at (K, 3) coefficients
        ``k = (kx, ky, 0)`` (Fourier pixels of the unpadded grid, |k| ≤ ``radius``): (M, K) complex, the spectrum
        at ``Aᵀ·k`` (``project``'s values without the inverse FFT). ``chunk``: coordinates per interpolation call."""
        vol, m = self._crop(radius)
        k = kvec.shape[0]
        out = torch.empty((mats.shape[0], k), dtype=torch.complex64, device=mats.device)
        step = max(1, chunk // max(k, 1))
        for lo in range(0, mats.shape[0], step):
            coords = torch.einsum("mji,kj->mki", mats[lo:lo + step], kvec) * (self.pad / m)
            s = F.grid_sample(vol, coords[None, None], mode="bilinear", padding_mode="zeros",
                              align_corners=True)[0, :, 0]  # (2, M, K)
            out[lo:lo + step] = torch.complex(s[0], s[1])
        return out


class Backprojector:
    """Direct Fourier reconstruction: accumulates CTF-weighted slices on a padded grid, then a Wiener-like
    division. Memory is fixed by the box (not the particle count): (pad·D)³ complex plus weights."""

    def __init__(self, box: int, pad: int = 2, device=None):
        self.box, self.pad, self.n = box, pad, pad * box
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num = torch.zeros(self.n**3, dtype=torch.complex64, device=self.device)
        self.den = torch.zeros(self.n**3, dtype=torch.float32, device=self.device)
        ky, kx = grid_2d(self.n, self.device)
        keep = (kx**2 + ky**2) <= (self.n // 2 - 1) ** 2
        self._k = torch.stack([kx, ky, torch.zeros_like(kx)], -1)[keep]  # (P, 3) in padded-grid units
        self._keep = keep

    def insert(self, images, quats, shifts_px=None, ctf: torch.Tensor | None = None, weights=None,
               group: np.ndarray | None = None) -> None:
        """Add (B, D, D) images at (B, 4) poses. ``ctf``: (B, D, D) on the unpadded grid; ``weights``: (B,);
        ``group``: (G, 4) symmetry quaternions (each image is inserted at every symmetry mate)."""
        images = as_tensor(images, self.device)
        b, d = images.shape[0], self.box
        spec = fft2c(images)
        if shifts_px is not None:
            spec = spec * shift_phase(as_tensor(shifts_px, self.device), d, -1.0)  # centre the particle
        ctf = torch.ones_like(images) if ctf is None else as_tensor(ctf, self.device)
        spec = spec * ctf
        # oversample the (centred) image to the padded grid by zero-padding in real space
        spec = fft2c(pad_real(ifft2c(spec), self.n, 2))
        ctf2 = F.interpolate((ctf**2)[:, None], size=(self.n, self.n), mode="bilinear", align_corners=False)[:, 0]
        spec, ctf2 = spec[:, self._keep], ctf2[:, self._keep]  # (B, P)
        w = torch.ones(b, device=self.device) if weights is None else as_tensor(weights, self.device)
        spec, ctf2 = spec * w[:, None], ctf2 * w[:, None]
        quats = np.asarray(quats, dtype=np.float64)
        mates = [quats] if group is None else [rotations.quat_mul(quats, g[None]) for g in np.asarray(group)]
        for q in mates:
            coords = torch.einsum("bji,pj->bpi", _matrices(q, self.device), self._k) + self.n // 2
            self._scatter(coords.reshape(-1, 3), spec.reshape(-1), ctf2.reshape(-1))

    def _scatter(self, coords, values, weights) -> None:
        base = torch.floor(coords)
        frac = coords - base
        base = base.long()
        n = self.n
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                         * (frac[:, 2] if dz else 1 - frac[:, 2]))
                    x, y, z = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                    ok = (x >= 0) & (x < n) & (y >= 0) & (y < n) & (z >= 0) & (z < n)
                    flat = (z * n + y) * n + x
                    self.num.index_add_(0, flat[ok], values[ok] * w[ok])
                    self.den.index_add_(0, flat[ok], weights[ok] * w[ok])

    def merge(self, other: "Backprojector") -> None:
        """Add another accumulator's sums (half-sets, shards)."""
        self.num += other.num
        self.den += other.den

    def reconstruct(self, regularization: float = 1e-3) -> torch.Tensor:
        """The map (D, D, D): num / (den + ε), ε = regularization × mean weight inside the sampled sphere."""
        n, d = self.n, self.box
        den = self.den.reshape(n, n, n)
        sampled = den[den > 0]
        eps = regularization * (sampled.mean() if sampled.numel() else torch.tensor(1.0, device=self.device))
        spec = self.num.reshape(n, n, n) / (den + eps)
        spec = spec * (radius_3d(n, self.device) <= n // 2 - 1)
        vol = ifft3c(spec).real
        vol = pad_real(vol, d, 3) / _gridding(n, d, self.device, 3)
        # zero the corners outside the inscribed sphere (as RELION does): they hold only amplified noise
        edge = ((radius_3d(d, self.device) - (d / 2 - 2)) / 2).clamp(0, 1)
        return vol * (0.5 + 0.5 * torch.cos(np.pi * edge)) * (n**3 / d**2) / self.pad
