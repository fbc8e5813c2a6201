"""Local search of projection matching (torch): coarse-to-fine over rotations near a start pose, then the final
shift and score.

Candidates ``dq ⊗ q`` (``dq`` = rotation vectors on a cubic grid inside a ball; left multiplication perturbs the
pose in the image frame, so an in-plane ``dq`` about z is a change of psi as in ``rotations.psi_rotation_quats``).
Level 1 spans the search radius in ``first_level_steps`` grid steps (3: 123 candidates, 2: 33) and searches every
integer shift of the window by FFT; each later level halves the step (the FINE_LEVEL_STEPS ball, 33 candidates
around the best) with a 3x3 sub-pixel shift grid, until the step is at most FINAL_STEP / r_max. A parabola per
rotation axis refines the last level's best, and the final shift is the sub-pixel (parabolic) peak of a
2x-upsampled FFT cross-correlation over the whole window.

Confidence: the posterior mass (``exp(ll)`` normalised over level 1's poses, best shift each) within 1.5 grid steps
of the best pose, halved when the search ended at the rim of its ball (the optimum may lie outside the searched
region).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.refine.scoring import (
    HalfPlaneCoefficients, ParticleTerms, SearchSettings, best_numerators_by_fft, numerators_at_shifts,
    parabola_vertex, resolution_for_step, shift_window,
)

FINE_LEVEL_STEPS = 2.0  # later levels search |g| ≤ FINE_LEVEL_STEPS grid steps (33 points; 1.5: 19 points)
FINAL_STEP = 1.1  # the last local level's angular step is at most FINAL_STEP / r_max radians


@functools.cache
def ball_points(radius: float) -> np.ndarray:
    """Integer points g of Z³ with |g| ≤ radius, (L, 3) float; sorted by |g| (the centre first)."""
    m = math.floor(radius)
    r = np.arange(-m, m + 1)
    g = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    g = g[np.linalg.norm(g, axis=1) <= radius + 1e-6]
    order = np.argsort(np.linalg.norm(g, axis=1), kind="stable")
    return g[order].astype(np.float64)


@functools.cache
def ball_neighbours(radius: float) -> np.ndarray:
    """(L, 3, 2) indices into ball_points(radius) of each point's neighbours -e_a and +e_a (-1 where outside)."""
    g = ball_points(radius).round().astype(int)
    index = {tuple(p): i for i, p in enumerate(g)}
    out = np.full((len(g), 3, 2), -1, np.int64)
    for i, p in enumerate(g):
        for a in range(3):
            e = np.eye(3, dtype=int)[a]
            out[i, a, 0] = index.get(tuple(p - e), -1)
            out[i, a, 1] = index.get(tuple(p + e), -1)
    return out


def _templates(projector: Projector, coef: HalfPlaneCoefficients, cand: torch.Tensor, r: float,
               s: SearchSettings) -> torch.Tensor:
    """(B, L, 4) candidate poses -> (B, L, K) templates over the coefficients of radius ≤ r."""
    k = coef.count(r)
    mats = rotations.quat_to_matrix_torch(cand).reshape(-1, 3, 3)
    return projector.sample_slices(mats, coef.kvec[:k], r, s.chunk).reshape(cand.shape[0], cand.shape[1], k)


def _numerators_near(t: torch.Tensor, batch: ParticleTerms, coef: HalfPlaneCoefficients, shift: torch.Tensor,
                     r: float, s: SearchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """A later level's shift search: the best of a 3x3 grid around each particle's (B, 2) shift (step between
    1/8 and 1/2 px, finer at higher resolution ``r``), within the window. (B, L) numerators, (B, L, 2) shifts."""
    dev = t.device
    step = max(0.125, min(0.5, coef.box / (8.0 * r)))
    off = torch.stack(torch.meshgrid(*[torch.tensor([-step, 0.0, step], device=dev)] * 2, indexing="xy"),
                      -1).reshape(-1, 2)
    cand_shift = shift[:, None] + off  # (B, 9, 2)
    inside = ((cand_shift - batch.centre[:, None]) ** 2).sum(-1) <= s.max_shift_px**2 + 1e-6
    nums = numerators_at_shifts(t, batch, coef, cand_shift)  # (B, L, 9)
    nums = nums.masked_fill(~inside[:, None], float("-inf"))
    num, si = nums.max(-1)
    l = t.shape[1]
    shifts = torch.gather(cand_shift[:, None].expand(-1, l, -1, -1), 2, si[..., None, None].expand(-1, -1, 1, 2))
    return num, shifts[:, :, 0]


def local_search(projector: Projector, coef: HalfPlaneCoefficients, batch: ParticleTerms, q0: torch.Tensor,
                 radius: torch.Tensor, s: SearchSettings, groups: int = 1, first_level_steps: int = 3):
    """Coarse-to-fine local search from (B, 4) starts within (B,) radii (radians). With ``groups`` > 1 the rows
    are consecutive groups of candidates for one particle: after level 1 only each group's best continues.
    Returns quat (B', 4), confidence (B',) and the batch (B' rows), B' = B / groups."""
    dev = q0.device
    q_start = q0
    final = FINAL_STEP / s.r_max
    r_top = radius.max().cpu()  # the largest radius on the host: one wait for the device per search, not per level
    n_levels, h_max = 1, float(r_top) / first_level_steps
    while h_max > final and n_levels < 8:
        h_max /= 2
        n_levels += 1
    q = q0
    shift = batch.centre.clone()
    conf = None
    for j in range(n_levels):
        units = first_level_steps if j == 0 else FINE_LEVEL_STEPS
        h = radius / (first_level_steps * 2.0**j)
        grid = torch.as_tensor(ball_points(units), dtype=torch.float32, device=dev)  # (L, 3)
        r = resolution_for_step(float(r_top / (first_level_steps * 2.0**j)), s) if j < n_levels - 1 else s.r_max
        k = coef.count(r)
        dq = rotations.rotvec_to_quat_torch(grid[None] * h[:, None, None])  # (B, L, 4)
        cand = rotations.quat_mul(dq, q[:, None])  # dq ⊗ q
        t = _templates(projector, coef, cand, r, s)
        den = (t.real**2 + t.imag**2) @ batch.c2w[:, :k, None]  # (B, L, 1)
        den = den[..., 0].clamp(min=1e-30)
        if j == 0:
            num, shifts = best_numerators_by_fft(t, batch, coef, shift_window(coef.box, 1, s.max_shift_px, "cpu"), 1,
                                                 s.chunk)
        else:
            num, shifts = _numerators_near(t, batch, coef, shift, r, s)
        ll = num.clamp(min=0) ** 2 / den
        if j == 0:
            conf = local_confidence(ll, grid)
            if groups > 1:  # keep each particle's best candidate
                g = ll.max(-1).values.reshape(-1, groups).argmax(-1)
                keep = torch.arange(len(g), device=dev) * groups + g
                ll, num, den, shifts, cand, t = ll[keep], num[keep], den[keep], shifts[keep], cand[keep], t[keep]
                batch, h, radius, conf = batch.take(keep), h[keep], radius[keep], conf[keep]
                q_start, r_top = q_start[keep], radius.max().cpu()
        best = ll.argmax(-1)
        rows = torch.arange(len(best), device=dev)
        q, shift = cand[rows, best], shifts[rows, best]
        if j == n_levels - 1:  # parabola per rotation axis around the best
            q = parabolic_rotation(num / den.sqrt(), grid, units, best, h, q, rows)
    # a pose that moved to the rim of the searched ball may have its optimum outside: halve the confidence
    moved = rotations.geodesic(q, q_start)
    conf = torch.where(moved > 0.9 * radius, conf * 0.5, conf)
    return q, conf, batch


def local_confidence(ll: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(B, L) log-likelihoods on the (L, 3) ball grid -> (B,) posterior mass within 1.5 steps of the best."""
    p = torch.softmax(ll, -1)
    best = ll.argmax(-1)
    near = ((grid[None] - grid[best][:, None]) ** 2).sum(-1) <= 1.5**2 + 1e-6  # (B, L)
    return (p * near).sum(-1)


def parabolic_rotation(cc, grid, units, best, h, q_best, rows):
    """Refine the best of a level by a parabola along each axis of the rotation-vector grid: (B, L) scores ``cc``
    on the (L, 3) ball ``grid`` of radius ``units`` steps of (B,) ``h`` radians, (B,) index ``best`` of the best
    candidate ``q_best`` (B, 4); ``rows`` = arange(B). Returns (B, 4)."""
    nb = torch.as_tensor(ball_neighbours(units), device=cc.device)[best]  # (B, 3, 2)
    ok = (nb >= 0).all(-1)
    c0 = cc[rows, best][:, None]
    cm = torch.gather(cc, 1, nb[..., 0].clamp(min=0))
    cp = torch.gather(cc, 1, nb[..., 1].clamp(min=0))
    delta = torch.where(ok, parabola_vertex(cm, c0, cp), torch.zeros_like(cm))  # (B, 3) in grid steps
    gb = grid[best]
    # the candidate was dq(h·gb) ⊗ q_prev: move to dq(h·(gb + delta)) ⊗ q_prev
    q_prev = rotations.quat_mul(rotations.quat_conj(rotations.rotvec_to_quat_torch(gb * h[:, None])), q_best)
    return rotations.quat_mul(rotations.rotvec_to_quat_torch((gb + delta) * h[:, None]), q_prev)


def final_shift_and_score(projector: Projector, coef: HalfPlaneCoefficients, batch: ParticleTerms, q: torch.Tensor,
                          s: SearchSettings):
    """Final shift (2x-upsampled FFT, parabolic peak, whole window) and score at full resolution for (B, 4) poses:
    shift (B, 2) pixels, normalised correlation cc (B,), log-likelihood ll (B,)."""
    k = coef.count(s.r_max)
    t = projector.sample_slices(rotations.quat_to_matrix_torch(q), coef.kvec[:k], s.r_max, s.chunk)[:, None]
    _, shift = best_numerators_by_fft(t, batch, coef, shift_window(coef.box, 2, s.max_shift_px, "cpu"), 2,
                                      s.chunk)
    shift = shift[:, 0]
    num = numerators_at_shifts(t, batch, coef, shift[:, None])[:, 0, 0]
    den = ((t[:, 0].real**2 + t[:, 0].imag**2) * batch.c2w[:, :k]).sum(-1).clamp(min=1e-30)
    cc = num / (den * batch.xw[:, k - 1].clamp(min=1e-30)).sqrt()
    ll = num.clamp(min=0) ** 2 / den
    return shift, cc, ll


def local_refine(projector: Projector, coef: HalfPlaneCoefficients, batch: ParticleTerms, q0: torch.Tensor,
                 radius: torch.Tensor, s: SearchSettings, groups: int = 1, first_level_steps: int = 3):
    """``local_search`` then ``final_shift_and_score``: quat (B', 4), shift (B', 2) pixels, cc, ll and confidence
    (B',), B' = B / groups."""
    q, conf, batch = local_search(projector, coef, batch, q0, radius, s, groups, first_level_steps)
    shift, cc, ll = final_shift_and_score(projector, coef, batch, q, s)
    return q, shift, cc, ll, conf
