"""Junk of the kinds 2D classification removes (issue 21), labelled in truth.star's rlnCryoforumJunk.

Kinds 1-3 are drawn by ``sim.dataset.simulate`` itself (pure noise, a particle 25-40 % of the box off its origin,
a projection of a different map); kinds 4-9 by ``JunkMaker`` here, each from one function of its physical object:

  4 ice        ice contamination: a dense disc much thicker than the particle (dark in the micrograph, bright in
               RELION's inverted particles like the protein), partly covering the box; no particle
  5 crystal    crystalline ice: a hexagonal lattice of dense dots across the box; no particle
  6 carbon     a carbon edge: a step of density across the box at a random angle and offset; no particle
  7 aggregate  two particles touching: the particle plus a second one at a random pose about one diameter away
  8 neighbour  the particle plus a second one whose centre sits at the box edge (half of it enters the box)
  9 empty      empty ice the picker took for a particle: a particle-sized smooth bump of ice, no projection

Every object is a density (units of the particle's projected peak density) seen through the particle's CTF and
B-factor envelope, as the particle is. Per-particle parameters are drawn once for the whole set, so chunking does
not change the images.
"""

from __future__ import annotations

import numpy as np
import torch

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.fourier import grid_2d, pad_real, radius_3d
from cryoforum_plugin.sim.realism import fourier_filtered

JUNK_KINDS = {1: "noise", 2: "off-centre", 3: "other map", 4: "ice", 5: "crystal", 6: "carbon", 7: "aggregate",
              8: "neighbour", 9: "empty"}
"""rlnCryoforumJunk label -> kind (0: a real particle)."""
DEFAULT_JUNK_KINDS = "noise,off-centre,other-map"
"""``--junk-kinds``' default: the kinds of the paper's protocol."""
MAKER_KINDS = (4, 5, 6, 7, 8, 9)
"""The kinds ``JunkMaker`` draws."""


def parse_junk_kinds(text: str) -> tuple[int, ...]:
    """'ice,carbon,...' (names of JUNK_KINDS, 'other-map' for 'other map') -> their labels, in the order given."""
    by_name = {name.replace(" ", "-"): k for k, name in JUNK_KINDS.items()}
    names = [t.strip().replace(" ", "-") for t in str(text).split(",") if t.strip()]
    unknown = [t for t in names if t not in by_name]
    if unknown or not names:
        raise CryoforumError(f"unknown junk kind(s) {', '.join(unknown) or '(none given)'} in --junk-kinds.",
                             fix="give a comma-separated list of " + ", ".join(by_name) + ".")
    return tuple(dict.fromkeys(by_name[t] for t in names))


def assign_junk(n: int, fraction: float, kinds, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64 labels: ``round(fraction·n)`` random particles are junk, each of a kind of ``kinds`` with equal
    probability (for kinds 1-3 the same draws as before kinds 4-9 existed), the others 0."""
    junk = np.zeros(n, np.int64)
    n_junk = int(round(fraction * n))
    if n_junk:
        idx = rng.choice(n, n_junk, replace=False)
        junk[idx] = np.asarray(kinds, np.int64)[rng.integers(0, len(kinds), n_junk)]
    return junk


def particle_radius_px(volume: torch.Tensor, fraction: float = 0.95) -> float:
    """Radius (voxels) of the centred sphere holding ``fraction`` of the map's positive density."""
    r = radius_3d(volume.shape[-1], volume.device).reshape(-1)
    w = volume.clamp(min=0).reshape(-1).double()
    order = torch.argsort(r)
    cum = torch.cumsum(w[order], 0) / w.sum().clamp(min=1e-30)
    return float(r[order][torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype, device=cum.device))
                          .clamp(max=len(r) - 1)])


# ---------------------------------------------------------------- the objects (unit density, real space)
def _xy(box: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ky, kx = grid_2d(box, device)
    return kx[None], ky[None]


def _column(values, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=torch.float32, device=device)[:, None, None]


def soft_disc(centre_px: np.ndarray, radius_px: np.ndarray, box: int, edge_px: float = 2.0,
              device=None) -> torch.Tensor:
    """(B, box, box) discs of density 1 (centres (B, 2) x, y px from the box centre, radii (B,) px), with a
    cosine edge ``edge_px`` wide: ice contamination."""
    x, y = _xy(box, device)
    r = torch.sqrt((x - _column(centre_px[:, 0], device)) ** 2 + (y - _column(centre_px[:, 1], device)) ** 2)
    t = ((r - _column(radius_px, device)) / edge_px + 0.5).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(np.pi * t)


def step_edge(normal_rad: np.ndarray, offset_px: np.ndarray, box: int, width_px: float = 1.5,
              device=None) -> torch.Tensor:
    """(B, box, box) density 0 -> 1 across the line ``x·n = offset`` (normal angle (B,) rad, offset (B,) px from the
    centre), a logistic edge ``width_px`` wide: a carbon film's edge."""
    x, y = _xy(box, device)
    along = x * _column(np.cos(normal_rad), device) + y * _column(np.sin(normal_rad), device)
    return torch.sigmoid((along - _column(offset_px, device)) / width_px)


def hex_lattice(period_px: np.ndarray, angle_rad: np.ndarray, origin_px: np.ndarray, box: int,
                dot_fraction: float = 0.25, device=None) -> torch.Tensor:
    """(B, box, box) hexagonal lattices of Gaussian dots of peak 1 (period (B,) px, lattice angle (B,) rad, a
    lattice point at ``origin_px`` (B, 2)), dot σ = ``dot_fraction``·period: crystalline ice. The nearest lattice
    point of a pixel is a corner of its lattice rhombus (two equilateral triangles)."""
    x, y = _xy(box, device)
    p, a = _column(period_px, device), _column(angle_rad, device)
    u, v = x - _column(origin_px[:, 0], device), y - _column(origin_px[:, 1], device)
    a1, a2 = (torch.cos(a), torch.sin(a)), (torch.cos(a + np.pi / 3), torch.sin(a + np.pi / 3))
    det = a1[0] * a2[1] - a1[1] * a2[0]
    c1 = (u * a2[1] - v * a2[0]) / (det * p)  # lattice coordinates
    c2 = (a1[0] * v - a1[1] * u) / (det * p)
    best = None
    for d1 in (0, 1):
        for d2 in (0, 1):
            f1, f2 = c1 - torch.floor(c1) - d1, c2 - torch.floor(c2) - d2
            dist2 = ((f1 * a1[0] + f2 * a2[0]) ** 2 + (f1 * a1[1] + f2 * a2[1]) ** 2) * p**2
            best = dist2 if best is None else torch.minimum(best, dist2)
    return torch.exp(-best / (2 * (dot_fraction * p) ** 2))


def gaussian_bump(sigma_px: np.ndarray, box: int, device=None) -> torch.Tensor:
    """(B, box, box) centred Gaussians of peak 1 and σ (B,) px: a particle-sized thickening of the ice."""
    x, y = _xy(box, device)
    return torch.exp(-(x**2 + y**2) / (2 * _column(sigma_px, device) ** 2))


def translated(images: torch.Tensor, shift_px: np.ndarray) -> torch.Tensor:
    """(B, N, N) images moved by whole pixels ``shift_px`` (B, 2) (x, y), zero-filled: what leaves the box is
    gone and nothing wraps round (unlike a Fourier shift)."""
    out = torch.zeros_like(images)
    n = images.shape[-1]
    for i, (dx, dy) in enumerate(np.rint(np.asarray(shift_px)).astype(int)):
        if abs(dx) < n and abs(dy) < n:
            out[i, max(dy, 0):n + min(dy, 0), max(dx, 0):n + min(dx, 0)] = \
                images[i, max(-dy, 0):n + min(-dy, 0), max(-dx, 0):n + min(-dx, 0)]
    return out


class JunkMaker:
    """Images of junk kinds 4-9 for the rows of a chunk (module docstring).

    ``junk`` (n,) labels of the whole set; ``projector`` the map's (physics.projector.Projector); ``radius_px`` the
    particle's radius (``particle_radius_px``); ``peak`` its projected peak density (the unit of the objects'
    densities); ``rng`` draws every particle's parameters here, once.
    """

    def __init__(self, junk: np.ndarray, projector, radius_px: float, peak: float, rng: np.random.Generator):
        self.junk, self.projector, self.radius, self.peak = np.asarray(junk), projector, radius_px, peak
        n, box = len(junk), projector.box
        self.box = box
        self.angle = rng.uniform(0, 2 * np.pi, n)  # direction of the blob / edge normal / second particle
        self.u = rng.uniform(0, 1, (n, 4))  # kind-specific sizes, distances and amplitudes
        self.quat2 = rotations.random_quats(n, rng)  # the second particle's pose
        self.shift2 = self._second_shift()

    def _second_shift(self) -> np.ndarray:
        """(n, 2) px: where the second particle of an aggregate (about one diameter away: 1.6-2.0 radii) or a
        neighbour (its centre at the box edge: box/2 - 0.2 .. + 0.4 radii) sits."""
        dist = np.where(self.junk == 7, self.radius * (1.6 + 0.4 * self.u[:, 0]),
                        self.box / 2 + self.radius * (-0.2 + 0.6 * self.u[:, 0]))
        return dist[:, None] * np.stack([np.cos(self.angle), np.sin(self.angle)], 1)

    def objects(self, kind: int, rows: np.ndarray, size: int, device=None) -> torch.Tensor:
        """(B, size, size) the density of kind 4, 5, 6 or 9 for ``rows`` (before the CTF), in units of ``peak``,
        on a ``size``-px grid with the box's centre (objects reach beyond the box: a larger grid keeps the CTF's
        fringes of their edges from wrapping round)."""
        a, u, box, r = self.angle[rows], self.u[rows], self.box, self.radius
        if kind == 4:  # contamination: radius 0.3-0.7 box, centre up to 0.5 box away, 2-8x the particle's peak
            centre = (0.5 * box * u[:, 0])[:, None] * np.stack([np.cos(a), np.sin(a)], 1)
            return _column(2 + 6 * u[:, 2], device) * soft_disc(centre, box * (0.3 + 0.4 * u[:, 1]), size,
                                                               device=device)
        if kind == 5:  # crystal: period 2.5-6 px, 0.5-1x the peak
            return _column(0.5 + 0.5 * u[:, 2], device) * hex_lattice(
                2.5 + 3.5 * u[:, 0], a, box * (u[:, 1:3] - 0.5), size, device=device)
        if kind == 6:  # carbon: offset up to 0.3 box from the centre, 1-2x the peak
            return _column(1 + u[:, 2], device) * step_edge(a, box * 0.6 * (u[:, 0] - 0.5), size, device=device)
        if kind == 9:  # empty ice: σ 0.4-0.7 radii, 0.3-0.6x the peak
            return _column(0.3 + 0.3 * u[:, 2], device) * gaussian_bump(r * (0.4 + 0.3 * u[:, 0]), size,
                                                                        device=device)
        raise ValueError(f"kind {kind} is not an object kind")

    def apply(self, images: torch.Tensor, rows: np.ndarray, filters) -> torch.Tensor:
        """The clean images (B, box, box) of ``rows`` (their particles' projections through their filters) with
        the junk of kinds 4-9 in place; other rows unchanged. ``filters(rows, size)``: the (B, size, size) CTF ×
        envelope of those rows on a ``size``-px grid, or None (neither). Objects are filtered on a grid twice the
        box and cropped; a second particle is projected in its own box and moved (``translated``)."""
        kinds = self.junk[rows]
        out = images.clone()
        for kind in np.intersect1d(kinds, MAKER_KINDS):
            m = np.nonzero(kinds == kind)[0]
            if kind in (7, 8):
                second = self.projector.project(self.quat2[rows[m]], None, filters(rows[m], self.box))
                out[m] = images[m] + translated(second, self.shift2[rows[m]])
                continue
            size = 2 * self.box
            obj = self.peak * self.objects(int(kind), rows[m], size, images.device)
            filt = filters(rows[m], size)
            out[m] = pad_real(obj if filt is None else fourier_filtered(obj, filt), self.box, 2)
        return out
