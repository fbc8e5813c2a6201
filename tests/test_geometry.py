"""Rotation conventions and round trips (property tests with hypothesis, plus the verified conventions)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from cryoforum_plugin.physics import rotations as geometry

angles = st.tuples(st.floats(-180, 180), st.floats(0.5, 179.5), st.floats(-180, 180))


@settings(max_examples=200, deadline=None)
@given(angles)
def test_relion_euler_round_trip(a):
    q = geometry.relion_euler_to_quat(*[np.array([v]) for v in a])
    back = geometry.quat_to_relion_euler(q)
    q2 = geometry.relion_euler_to_quat(*back.T)
    assert geometry.geodesic(q, q2)[0] < 1e-9
    # away from gimbal lock the angles themselves come back (-180° and 180° are the same rot or psi)
    wrapped = (np.asarray(a) - back[0] + 180.0) % 360.0 - 180.0
    assert np.allclose(wrapped, 0.0, atol=1e-6)


def test_internal_matrix_is_relions_A():
    """A = R.from_euler('ZYZ', [rot, tilt, psi]).as_matrix().T (conventions.md), and cryoSPARC pose = rotvec(Aᵀ)."""
    rng = np.random.default_rng(0)
    ang = np.stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)], 1)
    q = geometry.relion_euler_to_quat(*ang.T)
    A = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    assert np.allclose(geometry.quat_to_matrix(q), A, atol=1e-12)
    pose = geometry.quat_to_cryosparc_pose(q)
    assert np.allclose(Rotation.from_rotvec(pose).as_matrix(), A.transpose(0, 2, 1), atol=1e-12)
    # viewing direction is (cos rot sin tilt, sin rot sin tilt, cos tilt)
    r, t = np.radians(ang[:, 0]), np.radians(ang[:, 1])
    expect = np.stack([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)], 1)
    assert np.allclose(geometry.viewing_direction(q), expect, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda v: np.linalg.norm(v) > 0.1))
def test_rotvec_and_matrix_round_trip(v):
    q = geometry.normalize(np.array([v]))
    assert geometry.geodesic(q, geometry.cryosparc_pose_to_quat(geometry.quat_to_cryosparc_pose(q)))[0] < 1e-9
    assert geometry.geodesic(q, geometry.matrix_to_quat(geometry.quat_to_matrix(q)))[0] < 1e-9


def test_quat_mul_matches_matrix_product_and_geodesic_is_the_rotation_angle():
    rng = np.random.default_rng(1)
    p, q = geometry.random_quats(100, rng), geometry.random_quats(100, rng)
    assert np.allclose(geometry.quat_to_matrix(geometry.quat_mul(p, q)),
                       geometry.quat_to_matrix(p) @ geometry.quat_to_matrix(q), atol=1e-12)
    rel = geometry.quat_to_matrix(p).transpose(0, 2, 1) @ geometry.quat_to_matrix(q)
    angle = np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert np.allclose(geometry.geodesic(p, q), angle, atol=1e-6)
    assert np.allclose(geometry.geodesic(p, -q), geometry.geodesic(p, q))  # q and -q are one rotation
    assert np.allclose(geometry.geodesic(p, p), 0, atol=1e-6)


def test_geodesic_torch_matches_numpy_and_has_finite_gradient():
    import torch

    rng = np.random.default_rng(2)
    p, q = geometry.random_quats(20, rng), geometry.random_quats(20, rng)
    tp = torch.tensor(p, requires_grad=True)
    d = geometry.geodesic(tp, torch.tensor(p))  # identical rotations: acos at 1
    d.sum().backward()
    assert torch.isfinite(tp.grad).all()
    assert np.allclose(geometry.geodesic(torch.tensor(p), torch.tensor(q)).numpy(), geometry.geodesic(p, q), atol=1e-5)


def test_random_quats_are_uniform():
    """Median geodesic distance between uniform random rotations is about 2.3 rad (contracts.md)."""
    rng = np.random.default_rng(3)
    d = geometry.geodesic(geometry.random_quats(20000, rng), geometry.random_quats(20000, rng))
    assert abs(np.median(d) - 2.30) < 0.03
