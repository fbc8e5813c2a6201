"""The particles' side of the score: images and CTFs on the coefficient list, whitened by a noise model whose
level is calibrated on the data, so that the log-likelihood has its natural scale and the posterior its natural
width."""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.physics.noise import radial_power
from cryoforum_plugin.refine.scoring import HalfPlaneCoefficients, ParticleTerms

CALIBRATION_PARTICLES = 512  # the noise level (and, without a spectrum, its shape) comes from this many particles


def whitening(spectrum: np.ndarray, shells: torch.Tensor, box: int) -> torch.Tensor:
    """1/N(k) on the coefficient list (K,) from a radial spectrum (box//2 + 1 shells, noise.py's convention
    ``E|fft2c(x)|²/box²``): N = spectrum·box² at ``shells`` = round(|k|) (the last shell beyond)."""
    s = torch.as_tensor(np.asarray(spectrum, dtype=np.float64) * box * box, dtype=torch.float32,
                        device=shells.device)
    s = s.clamp(min=float(s.max()) * 1e-6 + 1e-30)
    return 1.0 / s[shells.clamp(max=len(s) - 1)]


def noise_weights(ps: ParticleSet, reader: StackReader, spectrum, coef: HalfPlaneCoefficients, box: int,
                  dev) -> torch.Tensor:
    """1/N on the coefficient list (K,). The shape comes from ``spectrum`` (or, without one, the mean power spectrum
    of up to CALIBRATION_PARTICLES particles); the level is set so that the data's power over the outer half of the
    used shells averages N there (noise-dominated at cryo-EM SNR), so the log-likelihood has its natural scale."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(ps), min(len(ps), CALIBRATION_PARTICLES), replace=False))
    power = np.zeros(box // 2 + 1)
    for lo in range(0, len(rows), 128):
        r = rows[lo:lo + 128]
        images = torch.from_numpy(ps.read_images(reader, r)).to(dev)
        power += radial_power(images).cpu().numpy() * len(r)
    power /= len(rows)
    if spectrum is None:
        shape = power
    else:
        shape = np.asarray(spectrum, dtype=np.float64).reshape(-1)
        if shape.shape != (box // 2 + 1,) or not np.all(np.isfinite(shape)) or shape.max() <= 0:
            raise CryoforumError(f"the noise spectrum must have {box // 2 + 1} finite values (one per shell of a "
                                 f"{box}-px box), got shape {shape.shape}.",
                                 fix="pass noise.estimate_noise_spectrum(...).spectrum for these particles.")
        shape = np.maximum(shape, shape.max() * 1e-6)
    hi = np.arange(box // 2 + 1)
    sel = (hi >= coef.r_max / 2) & (hi <= coef.r_max)
    level = float(np.mean(power[sel] / shape[sel])) if sel.any() else 1.0
    return whitening(shape * level, coef.shell, box)


def load_particle_terms(ft: torch.Tensor, ctf: torch.Tensor | None, coef: HalfPlaneCoefficients,
                        whiten: torch.Tensor, centre: np.ndarray) -> ParticleTerms:
    """The terms of B particles from their (B, N, N) centred Fourier transforms ``ft`` (``fft2c`` of
    ``ps.read_images``) and (B, N, N) CTFs on the same grid (``ctf_images``; None: no CTF): images and CTFs on
    the coefficient list, weighted by ``whiten`` (K,) = 1/N; ``centre`` (B, 2): their start shifts in pixels."""
    x = ft.reshape(len(ft), -1)[:, coef.flat]  # (B, K)
    c = torch.ones_like(x.real) if ctf is None else ctf.reshape(len(ft), -1)[:, coef.flat]
    y = x * (c * whiten)
    c2w = c * c * whiten
    xw = torch.cumsum((x.real**2 + x.imag**2) * whiten, -1)
    return ParticleTerms(y, c2w, xw, torch.as_tensor(centre, dtype=torch.float32, device=ft.device))
