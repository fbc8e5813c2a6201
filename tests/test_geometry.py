"""Rotation conventions and round trips (property tests with hypothesis, plus the verified conventions)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from cryoforum_plugin.physics import rotations

angles = st.tuples(st.floats(-180, 180), st.floats(0.5, 179.5), st.floats(-180, 180))


@settings(max_examples=200, deadline=None)
@given(angles)
def test_relion_euler_round_trip(a):
    q = rotations.relion_euler_to_quat(*[np.array([v]) for v in a])
    back = rotations.quat_to_relion_euler(q)
    q2 = rotations.relion_euler_to_quat(*back.T)
    assert rotations.geodesic(q, q2)[0] < 1e-9
    # away from gimbal lock the angles themselves come back (-180° and 180° are the same rot or psi)
    wrapped = (np.asarray(a) - back[0] + 180.0) % 360.0 - 180.0
    assert np.allclose(wrapped, 0.0, atol=1e-6)


def test_internal_matrix_is_relions_A():
    """A = R.from_euler('ZYZ', [rot, tilt, psi]).as_matrix().T (conventions.md), and cryoSPARC pose = rotvec(Aᵀ)."""
    rng = np.random.default_rng(0)
    ang = np.stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)], 1)
    q = rotations.relion_euler_to_quat(*ang.T)
    A = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    assert np.allclose(rotations.quat_to_matrix(q), A, atol=1e-12)
    pose = rotations.quat_to_cryosparc_pose(q)
    assert np.allclose(Rotation.from_rotvec(pose).as_matrix(), A.transpose(0, 2, 1), atol=1e-12)
    # viewing direction is (cos rot sin tilt, sin rot sin tilt, cos tilt)
    r, t = np.radians(ang[:, 0]), np.radians(ang[:, 1])
    expect = np.stack([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)], 1)
    assert np.allclose(rotations.viewing_direction(q), expect, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda v: np.linalg.norm(v) > 0.1))
def test_rotvec_and_matrix_round_trip(v):
    q = rotations.normalize(np.array([v]))
    assert rotations.geodesic(q, rotations.cryosparc_pose_to_quat(rotations.quat_to_cryosparc_pose(q)))[0] < 1e-9
    assert rotations.geodesic(q, rotations.matrix_to_quat(rotations.quat_to_matrix(q)))[0] < 1e-9


def test_quat_mul_matches_matrix_product_and_geodesic_is_the_rotation_angle():
    rng = np.random.default_rng(1)
    p, q = rotations.random_quats(100, rng), rotations.random_quats(100, rng)
    assert np.allclose(rotations.quat_to_matrix(rotations.quat_mul(p, q)),
                       rotations.quat_to_matrix(p) @ rotations.quat_to_matrix(q), atol=1e-12)
    rel = rotations.quat_to_matrix(p).transpose(0, 2, 1) @ rotations.quat_to_matrix(q)
    angle = np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert np.allclose(rotations.geodesic(p, q), angle, atol=1e-6)
    assert np.allclose(rotations.geodesic(p, -q), rotations.geodesic(p, q))  # q and -q are one rotation
    assert np.allclose(rotations.geodesic(p, p), 0, atol=1e-6)


def test_geodesic_torch_matches_numpy_and_has_finite_gradient():
    import torch

    rng = np.random.default_rng(2)
    p, q = rotations.random_quats(20, rng), rotations.random_quats(20, rng)
    tp = torch.tensor(p, requires_grad=True)
    d = rotations.geodesic(tp, torch.tensor(p))  # identical rotations: acos at 1
    d.sum().backward()
    assert torch.isfinite(tp.grad).all()
    assert np.allclose(rotations.geodesic(torch.tensor(p), torch.tensor(q)).numpy(), rotations.geodesic(p, q), atol=1e-5)


def test_random_quats_are_uniform():
    """Median geodesic distance between uniform random rotations is about 2.3 rad (contracts.md)."""
    rng = np.random.default_rng(3)
    d = rotations.geodesic(rotations.random_quats(20000, rng), rotations.random_quats(20000, rng))
    assert abs(np.median(d) - 2.30) < 0.03
