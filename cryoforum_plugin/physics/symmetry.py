"""Point-group symmetry in RELION's axis convention: Cn, Dn, T, O, I (I1-I4; ``I`` = I2, RELION's default).

A group is returned as (G, 4) quaternions (w, x, y, z) of its rotation matrices ``g``. The group acts on
the map side: a pose ``A`` and ``A·g`` give the same projection of a map with that symmetry, so in the
internal representation (see rotations.py) the symmetry class of ``q`` is ``{q ⊗ g}``.
The element sets are checked in the tests against ``relion_refine --sym G --print_symmetry_ops``.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.errors import CryoforumError

_PHI = (1 + 5**0.5) / 2

# (fold, axis) generators reproducing RELION 3.1's symmetries.cpp groups element for element.
_GENERATORS = {
    "T": [(3, (0, 0, 1)), (2, (0, (2 / 3) ** 0.5, (1 / 3) ** 0.5))],
    "O": [(4, (0, 0, 1)), (3, (1, 1, 1))],
    "I1": [(2, (1, 0, 0)), (5, (-_PHI, 0, 1)), (3, (_PHI**2, 1, 0))],
    "I2": [(2, (0, 0, 1)), (5, (1, 0, _PHI)), (3, (0, 1, _PHI**2))],
    "I3": [(2, (0, 1, 0)), (5, (0, 0, 1)), (3, (0.6070619982066862, 0, 0.7946544722917661))],
    "I4": [(2, (0, 1, 0)), (5, (0, 0, 1)), (3, (0.9822469463768455, 0, -0.1875924740850799))],
}


def _axis_rotation(fold: int, axis) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(axis / np.linalg.norm(axis) * 2 * np.pi / fold).as_matrix()


def _closure(generators: list[np.ndarray]) -> np.ndarray:
    elements = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                m = a @ g
                if not any(np.abs(m - b).max() < 1e-6 for b in elements):
                    elements.append(m)
                    new.append(m)
        frontier = new
    return np.array(elements)


def canonical_name(name: str) -> str:
    """Normalise a symmetry name ('c1', 'd7', 'i' ...) to RELION's spelling; raises for unknown groups."""
    s = str(name).strip().upper()
    if s == "I":
        s = "I2"
    if re.fullmatch(r"[CD][1-9][0-9]*", s) or s in _GENERATORS:
        return s
    raise CryoforumError(
        f"unknown symmetry group '{name}'.",
        fix="use C1, Cn, Dn, T, O, I or I1-I4 (RELION's conventions, e.g. C1, C4, D2, I).",
    )


@functools.lru_cache(maxsize=None)
def _group_matrices(name: str) -> np.ndarray:
    name = canonical_name(name)
    if name[0] in "CD":
        n = int(name[1:])
        gens = [_axis_rotation(n, (0, 0, 1))] if n > 1 else []
        if name[0] == "D":
            gens.append(_axis_rotation(2, (1, 0, 0)))
    else:
        gens = [_axis_rotation(f, a) for f, a in _GENERATORS[name]]
    return _closure(gens)


def group_matrices(name: str) -> np.ndarray:
    """(G, 3, 3) rotation matrices of the group, identity first."""
    return _group_matrices(canonical_name(name)).copy()


def group_quats(name: str) -> np.ndarray:
    """(G, 4) quaternions of the group, identity first."""
    return rotations.matrix_to_quat(_group_matrices(canonical_name(name)))


def order(name: str) -> int:
    """Number of elements of the group."""
    return len(_group_matrices(canonical_name(name)))


def _min(x, axis):
    return x.min(dim=axis).values if rotations._is_torch(x) else x.min(axis=axis)


def symmetric_geodesic(p, q, group):
    """min over g of d(p, q ⊗ g) in radians. p, q: (..., 4) (NumPy or torch); group: (G, 4) of the same kind."""
    expanded = rotations.quat_mul(q[..., None, :], group)  # (..., G, 4)
    return _min(rotations.geodesic(p[..., None, :], expanded), -1)


def symmetric_dot(a, b, group):
    """max over g of |<a, b ⊗ g>|, the cosine of half the symmetry-aware geodesic (torch, no acos: the global
    search compares it with cosines of angles); a, b: (..., 4) tensors that broadcast, group: (G, 4) tensor."""
    import torch

    best = None
    for g in group:
        d = (a * rotations.quat_mul(b, g.expand_as(b))).sum(-1).abs()
        best = d if best is None else torch.maximum(best, d)
    return best


# A reference direction near +z at rot = 0: its Dirichlet cell on the sphere is RELION's asymmetric unit
# for Cn and Dn (rot in [-180/n, 180/n], tilt <= 90) up to a boundary band of about 0.06 degrees, and a
# valid fundamental region for T, O and I.
_REF_DIRECTION = np.array([1e-3, 0.0, 1.0]) / np.linalg.norm([1e-3, 0.0, 1.0])


def reduce_to_asu(q, name: str):
    """Map each (N, 4) rotation to the canonical member of its symmetry class ``{q ⊗ g}``.

    The member whose viewing direction lies in the asymmetric unit is chosen (ties, for directions on a
    symmetry axis, broken by the in-plane angle), so symmetry-equivalent poses reduce to the same quaternion.
    A tensor is reduced on its device (float64 NumPy otherwise).
    """
    on_device = rotations._is_torch(q)
    q = q.reshape(-1, 4) if on_device else np.asarray(q, dtype=np.float64).reshape(-1, 4)
    group, ref = _constants_on(q.device, q.dtype, name) if on_device else (group_quats(name), _REF_DIRECTION)
    if len(group) == 1:
        return rotations.normalize(q)
    members = rotations.quat_mul(q[:, None, :], group[None])  # (N, G, 4)
    to_matrix = rotations.quat_to_matrix_torch if on_device else rotations.quat_to_matrix
    mats = to_matrix(members.reshape(-1, 4)).reshape(len(q), len(group), 3, 3)
    score = mats[:, :, 2, :] @ ref + 1e-7 * mats[:, :, 0, 0]
    best = score.argmax(1)
    rows = torch.arange(len(q), device=q.device) if on_device else np.arange(len(q))
    return rotations.normalize(members[rows, best])


@functools.lru_cache(maxsize=16)
def _constants_on(device, dtype, name: str) -> tuple:
    """(``group_quats(name)`` (G, 4), the reference direction (3,)) as tensors on ``device``, copied once."""
    return (torch.as_tensor(group_quats(name), dtype=dtype, device=device),
            torch.as_tensor(_REF_DIRECTION, dtype=dtype, device=device))


def in_asu(q, name: str, tol: float = 1e-6) -> np.ndarray:
    """Whether each (N, 4) rotation is its own canonical member (True) under the group."""
    return rotations.geodesic(reduce_to_asu(q, name), rotations.normalize(q)) < tol


def chance_median_error(name: str, n: int = 20000, seed: int = 0) -> float:
    """Median symmetry-aware geodesic error (radians) between independent uniform random rotations."""
    rng = np.random.default_rng(seed)
    a, b = rotations.random_quats(n, rng), rotations.random_quats(n, rng)
    return float(np.median(symmetric_geodesic(a, b, group_quats(name))))


def so3_grid(spacing_deg: float, sym: str = "C1") -> np.ndarray:
    """A near-uniform SO(3) grid (G, 4) of about ``spacing_deg`` steps: Fibonacci viewing directions × in-plane
    angles, reduced to the asymmetric unit of ``sym`` (the poses whose canonical member is themselves). The global
    search of refine/global_search.py and the grid head of model.py use it (here, not in rotations.py: it needs the
    groups, and this module imports rotations)."""
    step = np.radians(spacing_deg)
    n_dir = max(2, math.ceil(4 * np.pi / step**2))
    q = rotations.fibonacci_so3(n_dir, max(1, math.ceil(360.0 / spacing_deg)))
    if order(sym) > 1:
        q = q[in_asu(q, sym, tol=1e-5)]
    return q
