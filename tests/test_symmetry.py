"""Point groups in RELION's convention, symmetry-aware distance, reduction to the asymmetric unit."""

import re
import subprocess

import numpy as np
import pytest

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.errors import CryoforumError

GROUPS = ["C1", "C2", "C5", "D2", "D3", "T", "O", "I1", "I2", "I3", "I4"]


def relion_group(name):
    out = subprocess.run(["relion_refine", "--sym", name, "--print_symmetry_ops"], capture_output=True, text=True).stdout
    lines = out.splitlines()
    mats = [np.array([[float(v) for v in lines[i + k].split()] for k in (1, 2, 3)])
            for i, line in enumerate(lines) if re.match(r"\s*R\(\d+\)=", line)]
    return np.array(mats)


@pytest.mark.relion
@pytest.mark.parametrize("name", GROUPS[1:])
def test_groups_equal_relions(relion, name):
    ours = symmetry.group_matrices(name)
    theirs = relion_group(name)
    assert len(ours) == len(theirs)
    for m in theirs:  # every RELION element is one of ours (as sets; orders differ)
        assert np.abs(ours - m).max(axis=(1, 2)).min() < 1e-4


@pytest.mark.parametrize("name", GROUPS)
def test_symmetric_distance_is_invariant_and_reduction_canonical(name):
    rng = np.random.default_rng(0)
    group = symmetry.group_quats(name)
    p, q = rotations.random_quats(200, rng), rotations.random_quats(200, rng)
    g = group[rng.integers(0, len(group), 200)]
    q_mate = rotations.quat_mul(q, g)
    d1 = symmetry.symmetric_geodesic(p, q, group)
    assert np.allclose(d1, symmetry.symmetric_geodesic(p, q_mate, group), atol=1e-6)
    assert np.all(d1 <= rotations.geodesic(p, q) + 1e-9)
    r1, r2 = symmetry.reduce_to_asu(q, name), symmetry.reduce_to_asu(q_mate, name)
    assert np.allclose(rotations.geodesic(r1, r2), 0, atol=1e-5)  # same class -> same representative
    assert np.allclose(symmetry.symmetric_geodesic(r1, q, group), 0, atol=1e-5)  # still the same class
    assert symmetry.in_asu(r1, name).all()


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_cyclic_and_dihedral_asu_are_relions_ranges(n):
    """Cn: rot in [-180/n, 180/n]; Dn: additionally tilt <= 90 (up to a 0.1 degree boundary band)."""
    rng = np.random.default_rng(n)
    q = rotations.random_quats(2000, rng)
    for name in (f"C{n}", f"D{n}"):
        ang = rotations.quat_to_relion_euler(symmetry.reduce_to_asu(q, name))
        assert np.all(np.abs(ang[:, 0]) <= 180 / n + 0.1)
        if name[0] == "D":
            assert np.all(ang[:, 1] <= 90 + 0.1)


def test_chance_levels_and_bad_names():
    assert abs(symmetry.chance_median_error("C1", 20000) - 2.30) < 0.03
    assert symmetry.chance_median_error("D2", 20000) < symmetry.chance_median_error("C1", 20000)
    assert symmetry.canonical_name("i") == "I2" and symmetry.canonical_name("d7") == "D7"
    with pytest.raises(CryoforumError, match="unknown symmetry"):
        symmetry.canonical_name("X5")
