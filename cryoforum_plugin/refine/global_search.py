"""Global search of projection matching (torch), for particles with no or an untrusted start pose.

A near-uniform SO(3) grid (GLOBAL_SPACING_DEG, Fibonacci viewing directions × in-plane steps, restricted to the
asymmetric unit of ``sym``) at low resolution against a grid of shifts within ``max_shift`` of the start shift, as
GEMMs over one template bank shared by all particles; the GLOBAL_CANDIDATES best well-separated grid points are
refined locally (radius one grid step), the best after the first local level continues.

Confidence: the posterior mass (``exp(ll)`` normalised over the grid, best shift each) within 1.5 grid steps of the
best grid point (symmetry-aware).
"""

from __future__ import annotations

import math

import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.refine.local_search import local_refine
from cryoforum_plugin.refine.scoring import HalfPlaneCoefficients, ParticleTerms, SearchSettings, resolution_for_step

GLOBAL_SPACING_DEG = 12.5  # angular step of the global grid
GLOBAL_CANDIDATES = 4  # well-separated global-grid maxima refined locally
GLOBAL_SHIFT_STEP = 5.0  # global shift grid step = box / (GLOBAL_SHIFT_STEP · r) pixels
TOP_POINTS = 64  # the candidates are picked among this many best grid points


class GlobalBank:
    """The global grid of one refinement and its templates from one projector: ``quats`` (G, 4), ``spacing``
    (radians), resolution ``r`` and ``k`` coefficients, ``templates`` (2K, G) real and imaginary parts stacked,
    ``power`` (K, G) their squared modulus."""

    @torch.no_grad()
    def __init__(self, projector: Projector, coef: HalfPlaneCoefficients, s: SearchSettings, sym: str):
        self.spacing = math.radians(GLOBAL_SPACING_DEG)
        self.quats = torch.as_tensor(symmetry.so3_grid(GLOBAL_SPACING_DEG, sym), dtype=torch.float32,
                                     device=coef.kx.device)
        self.r = resolution_for_step(self.spacing, s)
        self.k = coef.count(self.r)
        t = projector.sample_slices(rotations.quat_to_matrix_torch(self.quats), coef.kvec[:self.k], self.r,
                                    s.chunk)  # (G, K)
        self.templates = torch.cat([t.real, t.imag], -1).T.contiguous()
        self.power = (t.real**2 + t.imag**2).T.contiguous()


def _shift_grid(coef: HalfPlaneCoefficients, r: float, s: SearchSettings, device) -> torch.Tensor:
    """(S, 2) offsets (pixels) within the shift window, step box / (GLOBAL_SHIFT_STEP · r) (at least 1/2 px)."""
    step = max(0.5, coef.box / (GLOBAL_SHIFT_STEP * r))
    m = math.floor(s.max_shift_px / step)
    o = torch.arange(-m, m + 1, device=device, dtype=torch.float32) * step
    off = torch.stack(torch.meshgrid(o, o, indexing="xy"), -1).reshape(-1, 2)
    return off[(off**2).sum(-1) <= s.max_shift_px**2 + 1e-6]


def _grid_log_likelihoods(bank: GlobalBank, coef: HalfPlaneCoefficients, batch: ParticleTerms,
                          s: SearchSettings) -> torch.Tensor:
    """(B, G) log-likelihood of every grid point, at its best shift of the shift grid."""
    k, n_grid = bank.k, bank.quats.shape[0]
    off = _shift_grid(coef, bank.r, s, bank.quats.device)
    n_s = off.shape[0]
    b = len(batch)
    ll = torch.empty((b, n_grid), device=bank.quats.device)
    g_chunk = max(256, min(n_grid, s.chunk // max(1, 4 * n_s)))
    b_chunk = max(1, s.chunk // (n_s * g_chunk))
    for lo in range(0, b, b_chunk):
        sl = slice(lo, lo + b_chunk)
        ys = batch.y[sl, None, :k] * coef.phase(batch.centre[sl, None] + off, k)  # (b', S, K)
        yc = torch.cat([ys.real, ys.imag], -1).reshape(-1, 2 * k)
        for g0 in range(0, n_grid, g_chunk):
            gs = slice(g0, g0 + g_chunk)
            tc = bank.templates[:, gs]
            num = (yc @ tc).reshape(-1, n_s, tc.shape[1]).max(1).values  # (b', g)
            den = (batch.c2w[sl, :k] @ bank.power[:, gs]).clamp(min=1e-30)
            ll[sl, gs] = num.clamp(min=0) ** 2 / den
    return ll


def global_candidates(bank: GlobalBank, coef: HalfPlaneCoefficients, batch: ParticleTerms, s: SearchSettings,
                      n_cand: int):
    """Exhaustive search over the global grid: (B, n_cand, 4) separated candidates and (B,) confidence."""
    dev = bank.quats.device
    grid_q, spacing = bank.quats, bank.spacing
    ll = _grid_log_likelihoods(bank, coef, batch, s)
    b = len(batch)
    # candidates: greedy non-maximum suppression among the TOP_POINTS best grid points
    top = ll.topk(min(TOP_POINTS, grid_q.shape[0]), dim=-1)
    tq = grid_q[top.indices]  # (B, TOP_POINTS, 4)
    cos_sep = math.cos(1.5 * spacing / 2)
    free = torch.ones(top.indices.shape, dtype=torch.bool, device=dev)
    rows = torch.arange(b, device=dev)
    picks = []
    for _ in range(int(n_cand)):
        i = torch.where(free.any(-1), free.float().argmax(-1), torch.zeros(b, dtype=torch.long, device=dev))
        picks.append(i)
        dots = symmetry.symmetric_dot(tq, tq[rows, i][:, None], s.group)  # (B, TOP_POINTS)
        free &= dots < cos_sep
    cand = torch.stack([tq[rows, i] for i in picks], 1)  # (B, n_cand, 4)
    # confidence: posterior mass within 1.5 grid steps of the best
    p = torch.softmax(ll, -1)
    dots = symmetry.symmetric_dot(grid_q[None], grid_q[top.indices[:, 0]][:, None], s.group)  # (B, G)
    conf = (p * (dots >= math.cos(1.5 * spacing / 2))).sum(-1)
    return cand, conf


def global_refine(projector: Projector, bank: GlobalBank, coef: HalfPlaneCoefficients, data: ParticleTerms,
                  s: SearchSettings):
    """Global grid search, local refinement of its candidates, final shift: quat (B, 4), shift (B, 2) pixels,
    cc, ll and confidence (B,)."""
    cand, conf = global_candidates(bank, coef, data, s, GLOBAL_CANDIDATES)
    m = cand.shape[1]
    rep = torch.arange(len(data), device=cand.device).repeat_interleave(m)
    radius = torch.full((len(data) * m,), bank.spacing, device=cand.device)
    q, shift, cc, ll, _ = local_refine(projector, coef, data.take(rep), cand.reshape(-1, 4), radius, s, groups=m,
                                       first_level_steps=2)
    return q, shift, cc, ll, conf
