"""What real particles have that white-noise, uniform-view sets lack (issue 21), one function per physical idea:
coloured noise (a radial power falling with frequency to a floor), an ice-thickness background (a smooth Gaussian
random field across the box), a noise level per micrograph, RELION's normalisation at extraction, B-factor
envelopes and preferred orientations, plus the view density a benchmark uses to find the rare views.

``sim.dataset.simulate`` applies them to its projections; ``benchmarks/realistic.py`` applies the same functions
to ``relion_project``'s clean projections. Images are (B, box, box) float tensors (y, x), frequencies s in 1/Å,
B-factors in Å², angles in degrees unless a name says rad. Spectra follow ``physics.noise``'s convention.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.fourier import as_tensor, fft2c, ifft2c, pad_real, radius_2d
from cryoforum_plugin.physics.noise import coloured_noise, relative_spectrum

REALISTIC = {"noise_bfactor": 500.0, "noise_floor": 0.1, "ice_std": 1.0, "ice_scale": 100.0,
             "particles_per_micrograph": 100, "micrograph_sigma": 0.25, "normalise": True,
             "bfactor_min": 50.0, "bfactor_max": 200.0, "defocus_min": 8000.0, "defocus_max": 28000.0,
             "astigmatism": 1000.0, "preferred_views": 0.6, "view_clusters": 3, "view_width": 12.0,
             "junk_fraction": 0.2, "junk_kinds": "ice,crystal,carbon,aggregate,off-centre,neighbour,empty"}
"""``cryoforum simulate --realistic``: the issue's set (d) (its Goal) — coloured noise with an ice background and a
level per micrograph, RELION normalisation, B-factors 50-200 Å², defocus 0.8-2.8 µm with up to 0.1 µm astigmatism,
60 % of the particles in 3 preferred views, 20 % junk of the kinds 2D classification removes (equal parts)."""


# ---------------------------------------------------------------- noise: colour, ice background, micrographs
def noise_shape(bfactor_A2: float, floor: float):
    """Relative noise power of spatial frequency s (1/Å): ``floor + (1 - floor)·exp(-B s²/4)`` (1 at s = 0).

    The fall-off of real particles' noise (dose weighting, the detector's MTF) as a B-factor ``bfactor_A2`` (Å²)
    down to a ``floor`` (fraction of the zero-frequency power: the shot noise that stays). B = 0 is white noise.
    Returns a callable of an array of s, as ``simulate(noise_spectrum=...)`` and ``noise.relative_spectrum`` take.
    """
    if bfactor_A2 < 0 or not 0 <= floor <= 1:
        raise ValueError(f"noise B-factor {bfactor_A2} Å² must be >= 0 and the floor {floor} in [0, 1]")

    def shape(s):
        s = np.asarray(s, dtype=np.float64)
        return floor + (1 - floor) * np.exp(-bfactor_A2 * s**2 / 4)

    return shape


def noise_spectrum(box: int, pixel_size_A: float, bfactor_A2: float, floor: float) -> np.ndarray:
    """(box//2 + 1,) per-shell power of ``noise_shape`` on a ``box``-px grid at ``pixel_size_A``, scaled to unit
    per-pixel variance (``noise.relative_spectrum``): multiply by σ² for noise of per-pixel variance σ²."""
    return relative_spectrum(noise_shape(bfactor_A2, floor), box, pixel_size_A)


def ice_background(n: int, box: int, pixel_size_A: float, scale_A: float, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
    """(n, box, box) smooth Gaussian random fields of unit (point) variance: ice-thickness variation across the box.

    A stationary field with Gaussian covariance ``exp(-r²/(2 L²))``, L = ``scale_A`` Å (power ∝ exp(-2π² L² s²)),
    drawn on a grid padded by 3 L on each side and cropped, so that the field is not periodic over the box (a
    gradient across it stays a gradient). Scaled by the field's expected standard deviation, not each image's, so
    the level varies from image to image as a field's does. The white noise is drawn on the generator's device.
    """
    if scale_A <= 0:
        raise ValueError(f"the ice background's length scale must be > 0 Å, got {scale_A}")
    size = box + 2 * int(math.ceil(3 * scale_A / pixel_size_A))
    size = min(size + size % 2, 4 * box)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    white = torch.randn((n, size, size), generator=generator, device=gen_device).to(device)
    s2 = radius_2d(size, white.device) ** 2 / (size * pixel_size_A) ** 2
    amp = torch.exp(-np.pi**2 * scale_A**2 * s2)  # sqrt of the power exp(-2π² L² s²)
    field = ifft2c(fft2c(white) * amp).real / amp.pow(2).mean().sqrt()
    return pad_real(field, box, 2).contiguous()


def micrograph_of(n: int, per_micrograph: int) -> np.ndarray:
    """(n,) int64 micrograph index (0-based) of each particle: consecutive groups of ``per_micrograph`` particles,
    as a particle STAR file lists them (0 or less: every particle on one micrograph)."""
    return np.arange(n, dtype=np.int64) // per_micrograph if per_micrograph > 0 else np.zeros(n, np.int64)


def micrograph_levels(n_micrographs: int, sigma_log: float, rng: np.random.Generator) -> np.ndarray:
    """(M,) noise standard deviation factors, one per micrograph: log-normal with median 1 and log-std
    ``sigma_log`` (ice thickness and dose differ between micrographs); 0 gives all 1."""
    return np.exp(sigma_log * rng.standard_normal(n_micrographs))


def micrograph_names(micrograph: np.ndarray) -> np.ndarray:
    """(n,) rlnMicrographName values for 0-based micrograph indices: ``micrographs/mic00001.mrc`` ..."""
    return np.array([f"micrographs/mic{m + 1:05d}.mrc" for m in np.asarray(micrograph)], dtype=object)


class Background:
    """What a particle's box holds besides the particle: Gaussian noise (white, or coloured by ``colour``) of
    standard deviation ``noise_std`` × its micrograph's level, plus an ice background (``ice_background``) of
    standard deviation ``ice_std`` × the same noise level, with length scale ``ice_scale_A``.

    ``level``: (n,) per-particle noise factor (``micrograph_levels`` of its micrograph; None: all 1). ``colour``:
    (box//2 + 1,) relative spectrum of unit per-pixel variance (``noise_spectrum``, ``noise.relative_spectrum``)
    or None. The noise and the ice fields come from two torch generators seeded from ``seed`` and are drawn in
    the order the chunks are added, so chunk sizes do not change the result (white noise is the same draw as
    before the ice background existed).
    """

    def __init__(self, box: int, pixel_size_A: float, noise_std: float, colour=None, level=None,
                 ice_std: float = 0.0, ice_scale_A: float = 100.0, seed: int = 0, device=None):
        self.box, self.pixel_size, self.noise_std, self.colour = box, pixel_size_A, noise_std, colour
        self.level, self.ice_std, self.ice_scale = level, ice_std, ice_scale_A
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.ice_gen = torch.Generator(device=device).manual_seed(seed + 104729)

    def add(self, clean: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """(B, box, box) the clean images of ``rows`` (0-based, in order) plus their background."""
        if self.noise_std <= 0:
            return clean
        scale = self.noise_std
        if self.level is not None:
            scale = self.noise_std * as_tensor(np.asarray(self.level)[rows], clean.device)[:, None, None]
        if self.colour is not None:
            noise = coloured_noise(len(rows), self.box, self.colour, self.gen, clean.device)
        else:
            noise = torch.randn(clean.shape, generator=self.gen, device=self.device).to(clean.device)
        out = clean + scale * noise
        if self.ice_std > 0:
            out = out + self.ice_std * scale * ice_background(len(rows), self.box, self.pixel_size, self.ice_scale,
                                                              self.ice_gen, clean.device)
        return out


# ---------------------------------------------------------------- signal: B-factor envelope
def bfactor_envelope(bfactor_A2: torch.Tensor, box: int, pixel_size_A) -> torch.Tensor:
    """(B, box, box) envelope ``exp(-B s²/4)`` on the centred Fourier grid (RELION's CTF B-factor,
    rlnCtfBfactor), for (B,) B-factors in Å² at ``pixel_size_A`` Å (scalar or (B,)); multiplies the CTF."""
    b = as_tensor(bfactor_A2).reshape(-1)
    apix = as_tensor(np.broadcast_to(np.asarray(pixel_size_A, dtype=np.float64), b.shape), b.device)
    s2 = radius_2d(box, b.device) ** 2 / (box * apix[:, None, None]) ** 2
    return torch.exp(-b[:, None, None] * s2 / 4)


def fourier_filtered(images: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(B, N, N) real images multiplied by (B, N, N) or (N, N) centred Fourier filters (a CTF, an envelope)."""
    return ifft2c(fft2c(images) * filters).real


# ---------------------------------------------------------------- orientations: preferred views
def vmf_directions(centres: np.ndarray, width_deg: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) unit directions, one drawn around each row of ``centres`` (n, 3) from a von Mises-Fisher
    distribution on the sphere of concentration κ = 1/width² (width in rad: for narrow clusters the angle to the
    centre is Rayleigh-distributed with this σ)."""
    centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    n = len(centres)
    kappa = 1.0 / np.radians(width_deg) ** 2
    u = rng.uniform(size=n)
    cos_t = 1 + np.log(u + (1 - u) * np.exp(-2 * kappa)) / kappa  # exact vMF on S² (Wood 1994)
    sin_t = np.sqrt(np.clip(1 - cos_t**2, 0, None))
    phi = rng.uniform(0, 2 * np.pi, n)
    helper = np.where(np.abs(centres[:, :1]) < 0.9, [[1.0, 0, 0]], [[0, 1.0, 0]])
    e1 = np.cross(centres, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(centres, e1)
    return cos_t[:, None] * centres + sin_t[:, None] * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)


def quats_from_directions(directions: np.ndarray, psi_deg: np.ndarray) -> np.ndarray:
    """(n, 4) quaternions whose viewing direction (``rotations.viewing_direction``) is ``directions`` (n, 3), with
    in-plane angles ``psi_deg`` (n,): RELION rot = atan2(y, x), tilt = acos(z)."""
    d = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
    return rotations.relion_euler_to_quat(rot, tilt, psi_deg)


def preferred_view_quats(n: int, fraction: float, n_views: int, width_deg: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orientations with a few dominant views: ``round(fraction·n)`` particles (random ones) from ``n_views``
    von Mises-Fisher clusters of viewing directions (uniformly random centres, equal shares, ``width_deg``), the
    rest uniform over SO(3); in-plane angles uniform. Returns quat (n, 4), the cluster of each particle (n,) int64
    (-1: uniform) and the centres (n_views, 3)."""
    centres = rng.standard_normal((max(n_views, 1), 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    quat = rotations.random_quats(n, rng)
    cluster = np.full(n, -1, np.int64)
    n_pref = int(round(fraction * n))
    if n_pref and n_views > 0:
        rows = rng.choice(n, n_pref, replace=False)
        cluster[rows] = rng.permutation(np.arange(n_pref) % n_views)
        dirs = vmf_directions(centres[cluster[rows]], width_deg, rng)
        quat[rows] = quats_from_directions(dirs, rng.uniform(0, 360, n_pref))
    return quat, cluster, centres


def view_density(quat: np.ndarray, width_deg: float = 15.0, max_reference: int = 5000, seed: int = 0,
                 chunk: int = 4096) -> np.ndarray:
    """(n,) density of viewing directions around each particle's, relative to uniform (1: as common as under
    uniform views; the rarest 10 % of views are the particles with the lowest values).

    A von Mises-Fisher kernel density (κ = 1/width², width in rad) at each particle's direction over the
    directions of up to ``max_reference`` particles (a seeded random subset), divided by the kernel's mean over the
    uniform sphere, (1 - e^{-2κ}) / (2κ). Directions only: the in-plane angle and symmetry are not used.
    Rows without a pose (NaN) get NaN.
    """
    quat = np.asarray(quat, dtype=np.float64)
    ok = np.isfinite(quat).all(axis=1)
    out = np.full(len(quat), np.nan)
    if not ok.any():
        return out
    d = rotations.viewing_direction(quat[ok])
    ref = d if len(d) <= max_reference else d[np.random.default_rng(seed).choice(len(d), max_reference,
                                                                                  replace=False)]
    kappa = 1.0 / np.radians(width_deg) ** 2
    uniform = (1 - np.exp(-2 * kappa)) / (2 * kappa)
    dens = np.concatenate([np.exp(kappa * (d[lo:lo + chunk] @ ref.T - 1)).mean(1) for lo in range(0, len(d), chunk)])
    out[ok] = dens / uniform
    return out

