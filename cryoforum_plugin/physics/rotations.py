"""Rotations: one internal representation and the conversions at the edges.

Internal representation (everywhere in cryo-forum): a unit quaternion ``q = (w, x, y, z)``
(scalar first) of RELION's matrix ``A`` = ``Euler_angles2matrix(rot, tilt, psi)``, the rotation
that takes map coordinates into the particle (image) frame. ``q`` and ``-q`` are the same rotation.

Edges (verified in ``shared/reference/conventions.md``):
- RELION angles (degrees): ``A = R.from_euler("ZYZ", [rot, tilt, psi]).as_matrix().T``.
- cryoSPARC ``alignments3D/pose`` (radians, rotation vector): ``R.from_rotvec(pose) = Aᵀ``.

The quaternion helpers (``quat_mul``, ``quat_conj``, ``geodesic``) accept NumPy arrays or torch
tensors of shape (..., 4), so the training losses use exactly the code the metrics use.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

# ---------------------------------------------------------------- array-agnostic quaternion algebra


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _stack(parts, like):
    if _is_torch(like):
        import torch

        return torch.stack(parts, dim=-1)
    return np.stack(parts, axis=-1)


def quat_mul(p, q):
    """Hamilton product ``p ⊗ q`` of (..., 4) quaternions (w, x, y, z); matrix(p⊗q) = matrix(p)·matrix(q)."""
    pw, px, py, pz = p[..., 0], p[..., 1], p[..., 2], p[..., 3]
    qw, qx, qy, qz = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    return _stack(
        [
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ],
        p,
    )


def quat_conj(q):
    """Inverse of a unit quaternion (the transposed matrix)."""
    return _stack([q[..., 0], -q[..., 1], -q[..., 2], -q[..., 3]], q)


def geodesic(p, q, eps: float = 1e-7):
    """Geodesic angle d(p, q) = 2·acos|<p, q>| in radians, in [0, π]; shapes broadcast over (..., 4).

    torch: the dot product is clamped to ``1 - eps`` so that the gradient stays finite (training losses).
    """
    dot = (p * q).sum(-1)
    if _is_torch(dot):
        import torch

        return 2.0 * torch.acos(dot.abs().clamp(max=1.0 - eps))
    # NumPy (metrics, I/O checks): the atan2 form keeps full precision near 0, where acos loses half the digits
    s = np.where(dot < 0, -1.0, 1.0)[..., None]
    return 4.0 * np.arctan2(np.linalg.norm(p - s * q, axis=-1), np.linalg.norm(p + s * q, axis=-1))


def normalize(q):
    """Unit quaternion with a non-negative scalar part (a canonical sign for storage and display). A tensor stays a
    tensor (its device and dtype); anything else becomes float64 NumPy."""
    if _is_torch(q):
        import torch

        q = q / q.norm(dim=-1, keepdim=True)
        return torch.where(q[..., :1] < 0, -q, q)
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


# ---------------------------------------------------------------- conversions (NumPy, float64)


def _rot(q) -> Rotation:
    return Rotation.from_quat(np.asarray(q, dtype=np.float64).reshape(-1, 4), scalar_first=True)


def _quat(r: Rotation) -> np.ndarray:
    return normalize(r.as_quat(scalar_first=True))


def quat_to_matrix(q) -> np.ndarray:
    """(N, 4) quaternions -> (N, 3, 3) RELION matrices ``A``."""
    return _rot(q).as_matrix()


def matrix_to_quat(m) -> np.ndarray:
    """(N, 3, 3) RELION matrices ``A`` -> (N, 4) quaternions."""
    return _quat(Rotation.from_matrix(np.asarray(m, dtype=np.float64).reshape(-1, 3, 3)))


def relion_euler_to_quat(rot, tilt, psi) -> np.ndarray:
    """RELION ``rlnAngleRot/Tilt/Psi`` in degrees, each (N,) -> (N, 4)."""
    angles = np.stack([np.ravel(rot), np.ravel(tilt), np.ravel(psi)], axis=-1).astype(np.float64)
    return _quat(Rotation.from_euler("ZYZ", angles, degrees=True).inv())


def quat_to_relion_euler(q) -> np.ndarray:
    """(N, 4) -> (N, 3) RELION (rot, tilt, psi) in degrees, tilt in [0, 180]."""
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():  # gimbal lock at tilt 0/180 is handled by scipy; silence its note
            warnings.simplefilter("ignore", UserWarning)
            return _rot(q).inv().as_euler("ZYZ", degrees=True)


def cryosparc_pose_to_quat(pose) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (N, 3) rotation vectors (radians) -> (N, 4)."""
    return _quat(Rotation.from_rotvec(np.asarray(pose, dtype=np.float64).reshape(-1, 3)).inv())


def quat_to_cryosparc_pose(q) -> np.ndarray:
    """(N, 4) -> cryoSPARC ``alignments3D/pose`` (N, 3) rotation vectors (radians)."""
    return _rot(q).inv().as_rotvec()


# ---------------------------------------------------------------- conversions (torch, any float dtype)


def quat_to_matrix_torch(q):
    """(..., 4) unit quaternion tensors (w, x, y, z) -> (..., 3, 3) RELION matrices ``A`` (``quat_to_matrix``'s,
    in torch, on the tensors' device and dtype)."""
    import torch

    w, x, y, z = q.unbind(-1)
    m = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1)
    return m.reshape(*q.shape[:-1], 3, 3)


def rotvec_to_quat_torch(v):
    """(..., 3) rotation-vector tensors (radians) -> (..., 4) unit quaternions (w ≥ 0 for angles ≤ π)."""
    import torch

    angle = v.norm(dim=-1, keepdim=True)
    half = angle / 2
    scale = torch.where(angle > 1e-12, torch.sin(half) / angle.clamp(min=1e-12), 0.5 - angle**2 / 48)
    return torch.cat([torch.cos(half), v * scale], -1)


def viewing_direction(q) -> np.ndarray:
    """(N, 4) -> (N, 3) unit projection direction in map coordinates (third row of ``A``).

    Equals (cos rot·sin tilt, sin rot·sin tilt, cos tilt) for RELION angles.
    """
    return quat_to_matrix(q)[:, 2, :]


def random_quats(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations uniform over SO(3) (normalised 4-D Gaussians), (n, 4)."""
    return normalize(rng.standard_normal((n, 4)))


def psi_rotation_quats(angles_deg) -> np.ndarray:
    """(B,) angles -> (B, 4) quaternions r with q(psi + a) = r ⊗ q(psi), i.e. r = rotation about z by -a."""
    half = -np.deg2rad(np.asarray(angles_deg, dtype=np.float64)) / 2
    return np.stack([np.cos(half), np.zeros_like(half), np.zeros_like(half), np.sin(half)], -1)


def fibonacci_so3(n_directions: int, n_psi: int) -> np.ndarray:
    """(n_directions · n_psi, 4) near-uniform rotations, like RELION's HEALPix sampling: viewing directions on a
    Fibonacci sphere (rot, tilt) × ``n_psi`` evenly spaced in-plane angles (psi, degrees), direction-major order.
    The one SO(3) grid: ``symmetry.so3_grid`` (grid head, global search) and the simulator's grid orientations."""
    i = np.arange(n_directions) + 0.5
    tilt = np.degrees(np.arccos(1 - 2 * i / n_directions))
    rot = np.degrees(np.pi * (1 + 5**0.5) * i) % 360
    psi = np.arange(n_psi) * 360.0 / n_psi
    return relion_euler_to_quat(np.repeat(rot, n_psi), np.repeat(tilt, n_psi), np.tile(psi, n_directions))
