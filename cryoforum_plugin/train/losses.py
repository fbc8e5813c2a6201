"""The training losses, as functions of tensors (the Trainer adds the L2 term and takes the optimiser steps).

Siamese loss per batch (B images, P pairs (i, j) drawn inside the batch, so memory grows with the pairs, never N²):
    β1 · 2·mean_i d(q̂_i, q_i)  +  β2 · mean_(i,j) |d(q̂_i, q̂_j) - d(q_i, q_j)|
with the curriculum β1 = max(floor, √(t/T)/2), β2 = 1 - √(t/T) ('siamese'; the paper: floor 0); β1 = 0
('siamese_noreg'); or β1 = 1/2, β2 = 0 ('single', one branch). d is the geodesic distance 2 acos|<p,q>| or, with
``distance_loss='chordal'``, 2 - 2|<p,q>|; symmetry-aware (minimum over the point group) with --sym.

The grid head (``head='grid'``, a classification over the SO(3) grid of model.py) has its own loss instead:
    -mean_i Σ_g t_i(g) log softmax(logits_i)(g),   t_i(g) ∝ exp(-d(g, q_i)² / (2σ²))
the cross-entropy against soft targets around the true orientation (d symmetry-aware as above), with σ annealed
geometrically from 3 grid spacings at the start to 0.75 at the end (``grid_sigma``). The Siamese distance term,
the curriculum (``loss``) and ``distance_loss`` do not apply to it: the targets already teach every distance,
and the distribution, not a distance between two predictions, is what the head outputs. Reported errors are
the geodesic errors of its mode, as for the other heads.

Quaternions are (..., 4) tensors (w, x, y, z); ``group`` is the (S, 4) point group of --sym (the identity alone
with --restrict-to-asu); ``progress`` is the training progress t/T in [0, 1].
"""

from __future__ import annotations

import math

import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry

N_DISTANCE_BINS = 8


def curriculum(mode: str, progress: float, beta1_floor: float = 0.0) -> tuple[float, float]:
    """(β1, β2) at training progress t/T in [0, 1]; ``beta1_floor`` applies to 'siamese' only."""
    if mode == "single":
        return 0.5, 0.0
    s = math.sqrt(min(max(progress, 0.0), 1.0))
    return (0.0 if mode == "siamese_noreg" else max(beta1_floor, s / 2)), 1.0 - s


def grid_sigma(progress: float, spacing_rad: float) -> float:
    """Width σ (radians) of the grid head's soft targets at training progress t/T in [0, 1]: geometric from
    3 grid spacings at t = 0 to 0.75 at t = 1 (wide targets first, so the first steps learn the coarse
    orientation from every neighbouring class; at the end about one grid step, the resolution of the grid)."""
    t = min(max(progress, 0.0), 1.0)
    return 3.0 * spacing_rad * 0.25**t


def grid_targets(grid: torch.Tensor, target: torch.Tensor, group: torch.Tensor, sigma: float) -> torch.Tensor:
    """Soft targets of the grid head, (B, G): t(g) ∝ exp(-d(g, q)² / (2σ²)) over the grid rotations ``grid``
    (G, 4) for each target ``q`` (B, 4), d the symmetry-aware geodesic (``group`` (S, 4)), σ in radians."""
    with torch.no_grad():
        grid = grid.to(device=target.device, dtype=target.dtype)
        d = symmetry.symmetric_geodesic(grid[None], target[:, None], group.to(target.dtype))  # (B, G)
        return torch.softmax(-(d**2) / (2 * sigma**2), dim=1)


def grid_cross_entropy(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cross-entropy -Σ_g t(g) log softmax(logits)(g), logits and targets (B, G);
    minimal (the entropy of t) at logits = log t + c."""
    return -(soft * torch.log_softmax(logits, dim=1)).sum(1).mean()


def grid_loss(logits: torch.Tensor, target: torch.Tensor, grid: torch.Tensor, group: torch.Tensor, progress: float,
              spacing_rad: float) -> torch.Tensor:
    """The grid head's loss at ``progress``: ``grid_cross_entropy`` of its (B, G) ``logits`` over the (G, 4)
    ``grid`` (spacing ``spacing_rad`` radians) against the soft targets around ``target`` (B, 4),
    σ = ``grid_sigma``."""
    sigma = grid_sigma(progress, spacing_rad)
    return grid_cross_entropy(logits, grid_targets(grid, target, group, sigma))


def symmetric_chordal(p: torch.Tensor, q: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """min over g of the squared quaternion chordal distance 2 - 2|<p, q ⊗ g>| (in [0, 2]; ≈ θ²/4 for small
    angles θ). p, q: (..., 4); group: (G, 4)."""
    expanded = rotations.quat_mul(q[..., None, :], group)
    return (2 - 2 * (p[..., None, :] * expanded).sum(-1).abs()).min(dim=-1).values


def loss_distance(p: torch.Tensor, q: torch.Tensor, group: torch.Tensor, kind: str) -> torch.Tensor:
    """The distance the losses use (``distance_loss``) between (..., 4) quaternions, symmetry-aware: the squared
    chordal distance (``kind='chordal'``) or the geodesic distance (radians)."""
    if kind == "chordal":
        return symmetric_chordal(p, q, group)
    return symmetry.symmetric_geodesic(p, q, group)


def sample_pairs(true_dist: torch.Tensor, n_pairs: int, mode: str,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (I, J), i != j, inside a batch. ``true_dist``: (B, B) true distances. 'random': uniform over pairs;
    'stratified': equal counts in each of 8 distance bins over [0, max distance]."""
    b = true_dist.shape[0]
    i, j = torch.triu_indices(b, b, offset=1, device=true_dist.device)
    if mode == "random" or len(i) <= n_pairs:
        pick = torch.randperm(len(i), generator=gen, device="cpu")[:n_pairs].to(i.device, non_blocking=True)
        return i[pick], j[pick]
    d = true_dist[i, j]
    edges = torch.linspace(0, float(d.max()) + 1e-6, N_DISTANCE_BINS + 1, device=d.device)
    bins = torch.bucketize(d, edges[1:-1])
    per_bin = max(1, n_pairs // N_DISTANCE_BINS)
    chosen = []
    for k in range(N_DISTANCE_BINS):
        members = torch.nonzero(bins == k).flatten()
        if len(members):
            idx = torch.randint(len(members), (per_bin,), generator=gen, device="cpu").to(members.device)
            chosen.append(members[idx])
    pick = torch.cat(chosen)
    return i[pick], j[pick]


def siamese_loss(quat: torch.Tensor, target: torch.Tensor, err: torch.Tensor, group: torch.Tensor,
                 progress: float, *, mode: str, beta1_floor: float, distance: str, n_pairs: int, pairs: str,
                 gen: torch.Generator) -> torch.Tensor:
    """β1 · 2·mean d(q̂, q) + β2 · mean over in-batch pairs |d(q̂_i, q̂_j) - d(q_i, q_j)| (module docstring) of the
    predictions ``quat`` (B, 4) and their ``target`` (B, 4): (β1, β2) = ``curriculum(mode, progress, beta1_floor)``,
    d = ``loss_distance(..., distance)``, ``n_pairs`` pairs drawn by ``sample_pairs`` (``pairs``, ``gen``). ``err``
    (B,) is the geodesic d(q̂, q) in radians, reused when the loss distance is the geodesic."""
    b1, b2 = curriculum(mode, progress, beta1_floor)
    d = err if distance == "geodesic" else loss_distance(quat, target, group, distance)
    total = b1 * 2 * d.mean()
    if b2 > 0 and len(target) > 1:
        with torch.no_grad():
            true_all = loss_distance(target[:, None, :], target[None, :, :], group, distance)
        i, j = sample_pairs(true_all, n_pairs, pairs, gen)
        pred_d = loss_distance(quat[i], quat[j], group, distance)
        total = total + b2 * (pred_d - true_all[i, j]).abs().mean()
    return total
