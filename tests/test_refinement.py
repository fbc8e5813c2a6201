"""Projection-matching refinement: recovery of known poses and shifts, convention traps, global search,
gold-standard half-maps, reference resampling and its errors. Particles come from our own Projector (no RELION
needed) and, in one test, from relion_project."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.data import BETAGAL_MAP, DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.physics.resample import resample
from cryoforum_plugin.formats.mrc import write_mrc
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.formats.star import read_star
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.physics.reconstruct import reconstruct
from cryoforum_plugin.refine.driver import refine
from cryoforum_plugin.physics.resample import resized_map



def make_particles(path, vol, apix, n, seed, snr=0.1, max_shift=3.0, half_set=None, sign=1.0):
    """n particles of ``vol`` made by our Projector at random poses, shifts up to ``max_shift`` px, per-particle
    astigmatic CTF and white noise; ``sign=-1`` makes them with the opposite shift sign (a convention bug)."""
    box = vol.shape[0]
    rng = np.random.default_rng(seed)
    quat = rotations.random_quats(n, rng)
    shift = rng.uniform(-max_shift, max_shift, (n, 2))
    du = rng.uniform(10000, 25000, n)
    ctf = {"defocus_u": du, "defocus_v": du - rng.uniform(0, 1000, n), "defocus_angle": rng.uniform(0, 180, n),
           "voltage": np.full(n, 300.0), "cs": np.full(n, 2.7), "amp_contrast": np.full(n, 0.1),
           "phase_shift": np.zeros(n)}
    c = ctf_images(ctf, np.arange(n), box, np.full(n, apix))
    images = Projector(vol).project(quat, torch.tensor(sign * shift, dtype=torch.float32), c).numpy()
    images += rng.normal(0, np.sqrt(images.var(axis=(1, 2)).mean() / snr), images.shape).astype(np.float32)
    write_mrc(path, images, apix)
    half = np.arange(n) % 2 + 1 if half_set is None else np.asarray(half_set)
    return ParticleSet(image_path=np.array([str(path)] * n, dtype=object), image_index=np.arange(n), quat=quat,
                       shift_A=shift * apix, pixel_size=np.full(n, apix), box=np.full(n, box), ctf=ctf,
                       optics_group=np.ones(n, np.int64), half_set=half.astype(np.int64),
                       uid=np.arange(n, dtype=np.uint64))


def rotate_by(q, deg, rng):
    axis = rng.normal(size=(len(q), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return rotations.normalize(rotations.quat_mul(Rotation.from_rotvec(axis * np.radians(deg)).as_quat(scalar_first=True), q))


def errors_deg(res, truth, sym="C1"):
    return np.degrees(symmetry.symmetric_geodesic(res.quat, truth.quat, symmetry.group_quats(sym)))


def shift_errors_px(res, truth):
    return np.linalg.norm(res.shift_A - truth.shift_A, axis=1) / truth.pixel_size


def starts(truth, quat, shift_A=None):
    return dataclasses.replace(truth, quat=quat, shift_A=np.zeros((len(truth), 2)) if shift_A is None else shift_A)


@pytest.fixture(scope="module")
def asym(tmp_path_factory):
    """The asymmetric map at 64 px and 64 particles of it (SNR 0.1, CTF, shifts up to 3 px)."""
    d = tmp_path_factory.mktemp("refine")
    vol, apix = resized_map(DEFAULT_MAP, 64)
    vol = vol.numpy()
    return {"dir": d, "vol": vol, "apix": apix, "ps": make_particles(d / "p.mrcs", vol, apix, 64, seed=1)}


def test_torch_rotation_helpers_match_geometry():
    rng = np.random.default_rng(0)
    q = rotations.random_quats(50, rng)
    assert np.allclose(rotations.quat_to_matrix_torch(torch.tensor(q)).numpy(), rotations.quat_to_matrix(q), atol=1e-12)
    v = rng.normal(size=(50, 3))
    ref = rotations.normalize(Rotation.from_rotvec(v).as_quat(scalar_first=True))
    assert np.allclose(rotations.normalize(rotations.rotvec_to_quat_torch(torch.tensor(v)).numpy()), ref, atol=1e-12)
    # the local search perturbs as dq ⊗ q (image frame): dq about z by -a is psi + a, as psi_rotation_quats says
    ang = rotations.quat_to_relion_euler(q)
    dq = rotations.rotvec_to_quat_torch(torch.tensor([[0.0, 0.0, -np.radians(30.0)]], dtype=torch.float64)).numpy()
    moved = rotations.quat_mul(dq, q)
    expected = rotations.relion_euler_to_quat(ang[:, 0], ang[:, 1], ang[:, 2] + 30.0)
    assert np.degrees(rotations.geodesic(moved, expected)).max() < 1e-6
    assert np.allclose(dq, rotations.psi_rotation_quats([30.0]), atol=1e-12)


@pytest.mark.parametrize("sym", ["C1", "D2"])
def test_global_grid_covers_rotation_space(sym):
    grid = symmetry.so3_grid(12.5, sym)
    g = symmetry.group_quats(sym)
    assert symmetry.in_asu(grid, sym).all()
    probe = rotations.random_quats(300, np.random.default_rng(1))
    # the symmetry-aware distance of any rotation to its nearest grid point stays below one grid step
    d = [np.degrees(symmetry.symmetric_geodesic(p[None], grid, g).min()) for p in probe]
    assert np.max(d) < 12.5, np.max(d)
    assert abs(len(grid) * symmetry.order(sym) / len(symmetry.so3_grid(12.5, "C1")) - 1) < 0.1


def test_local_refinement_recovers_poses_and_shifts(asym):
    """From 15° starts with unknown shifts (start 0) against the true map: poses and shifts recovered; the run is
    deterministic."""
    ps = asym["ps"]
    start = starts(ps, rotate_by(ps.quat, 15.0, np.random.default_rng(2)))
    res = refine(start, asym["vol"], reference_pixel_size=asym["apix"], global_search="none",
                 start_error_deg=np.full(len(ps), 15.0), progress=False)
    err, serr = errors_deg(res, ps), shift_errors_px(res, ps)
    assert np.mean(err < 3) >= 0.95 and np.median(err) < 1.5, (np.median(err), np.mean(err < 3))
    assert np.median(serr) < 0.3, np.median(serr)
    assert not res.global_searched.any()
    assert res.confidence.min() >= 0 and res.confidence.max() <= 1 and np.median(res.confidence) > 0.5
    again = refine(start, asym["vol"], reference_pixel_size=asym["apix"], global_search="none",
                   start_error_deg=np.full(len(ps), 15.0), progress=False)
    assert np.array_equal(again.quat, res.quat) and np.array_equal(again.shift_A, res.shift_A)


def test_convention_errors_are_detected(asym, tmp_path):
    """Transposed starts (A instead of Aᵀ) do not refine to the truth with a local search and score worse than
    the true starts; particles made with the opposite shift sign come back with the mirrored shifts, so the
    comparison with the truth fails."""
    ps = asym["ps"].subset(np.arange(32))
    vol, apix = asym["vol"], asym["apix"]
    kw = {"reference_pixel_size": apix, "global_search": "none", "start_error_deg": np.full(32, 5.0), "progress": False}
    good = refine(starts(ps, ps.quat), vol, **kw)
    transposed = refine(starts(ps, rotations.quat_conj(ps.quat)), vol, **kw)
    assert np.median(errors_deg(good, ps)) < 1.5
    assert np.mean(errors_deg(transposed, ps) < 5) < 0.2
    assert np.mean(transposed.score < good.score) > 0.9
    flipped = make_particles(tmp_path / "flip.mrcs", vol, apix, 32, seed=1, sign=-1.0)
    res = refine(starts(flipped, flipped.quat), vol, **kw)
    assert np.median(errors_deg(res, flipped)) < 1.5  # the pose is still found ...
    assert np.median(shift_errors_px(res, flipped)) > 1.0  # ... but the shifts disagree with the claimed ones
    mirrored = dataclasses.replace(flipped, shift_A=-flipped.shift_A)
    assert np.median(shift_errors_px(res, mirrored)) < 0.3


def test_global_search_from_random_starts(asym):
    ps = asym["ps"].subset(np.arange(40))
    start = starts(ps, rotations.random_quats(40, np.random.default_rng(3)))
    res = refine(start, asym["vol"], reference_pixel_size=asym["apix"], global_search="all", progress=False)
    err = errors_deg(res, ps)
    assert res.global_searched.all()
    assert np.mean(err < 5) >= 0.8, np.mean(err < 5)
    assert np.median(shift_errors_px(res, ps)) < 0.3
    good = err < 5
    if (~good).any():  # the confidence ranks the failures low
        assert np.median(res.confidence[~good]) < np.median(res.confidence[good])


def test_auto_mode_sends_unknown_and_uncertain_particles_to_the_global_search(asym):
    ps = asym["ps"].subset(np.arange(12))
    quat = ps.quat.copy()
    quat[:3] = np.nan  # no start pose
    uncertain = np.zeros(12, bool)
    uncertain[3:5] = True
    hint = np.full(12, 5.0)
    hint[5] = 90.0  # a hint past MAX_RADIUS_DEG
    quat[9:] = rotations.random_quats(3, np.random.default_rng(4))  # wrong starts that claim to be good
    res = refine(starts(ps, quat), asym["vol"], reference_pixel_size=asym["apix"], uncertain=uncertain,
                 start_error_deg=hint, progress=False)
    # the wrong starts end with a low confidence locally and fall back to the global search (unless the local
    # search from the wrong start already found the pose: then there is nothing to fall back for)
    err = errors_deg(res, ps)
    assert res.global_searched[:9].tolist() == [True] * 6 + [False] * 3
    assert (res.global_searched[9:] | (err[9:] < 5)).all() and res.global_searched[9:].sum() >= 2
    assert np.mean(err < 5) >= 0.9
    none = refine(starts(ps, quat), asym["vol"], reference_pixel_size=asym["apix"], uncertain=uncertain,
                  global_search="none", start_error_deg=hint, progress=False)
    assert none.global_searched.tolist() == [True] * 3 + [False] * 9  # no pose: always global
    assert np.mean(errors_deg(none, ps)[9:] < 5) < 0.5  # without the fallback the wrong starts stay wrong


def test_symmetric_map_d2(tmp_path):
    """D2 (β-galactosidase): the global grid covers the asymmetric unit; symmetry-aware errors are small."""
    vol, apix = resized_map(BETAGAL_MAP, 48)
    vol = vol.numpy()
    ps = make_particles(tmp_path / "d2.mrcs", vol, apix, 24, seed=4, snr=0.3, max_shift=2.0)
    start = starts(ps, rotations.random_quats(24, np.random.default_rng(5)))
    res = refine(start, vol, reference_pixel_size=apix, sym="D2", global_search="all", progress=False)
    err = errors_deg(res, ps, "D2")
    assert np.mean(err < 5) >= 0.8, np.sort(err)
    local = refine(starts(ps, rotate_by(ps.quat, 8.0, np.random.default_rng(6))), vol, reference_pixel_size=apix,
                   sym="D2", global_search="none", start_error_deg=np.full(24, 8.0), progress=False)
    assert np.median(errors_deg(local, ps, "D2")) < 2.0


def test_gold_standard_half_maps(asym, tmp_path):
    """Half-set 1 particles are matched against half1, half-set 2 against half2, unassigned ones against the half
    that ``particles.uid_half_sets`` gives them, which is also the half-map the reconstruction puts them in: no
    particle is matched against the other half's map, and the two half-maps hold disjoint particles. half2 here is
    the map with inverted contrast: a particle's result is the one it gets when every particle is matched against
    half1 (or every one against half2), which says which half it used."""
    from cryoforum_plugin.formats.particles import uid_half_sets

    vol, apix = asym["vol"], asym["apix"]
    half = np.array([1] * 12 + [2] * 12 + [0] * 24)
    ps = make_particles(tmp_path / "gs.mrcs", vol, apix, 48, seed=7, half_set=half)
    kw = {"reference_pixel_size": apix, "global_search": "none", "start_error_deg": np.full(48, 4.0), "progress": False}
    ref = {"half1": vol, "half2": -vol}
    res = refine(starts(ps, ps.quat, ps.shift_A), ref, **kw)
    assert (res.score[:12] > 0).all() and (res.score[12:24] < 0).all()
    by_uid = uid_half_sets(ps.uid[24:])
    assert 0.2 <= (by_uid == 1).mean() <= 0.8
    used = np.concatenate([half[:24], by_uid])
    alone = {h: refine(starts(dataclasses.replace(ps, half_set=np.full(48, h)), ps.quat, ps.shift_A), ref, **kw)
             for h in (1, 2)}
    assert (np.abs(alone[1].score - alone[2].score) > 1e-3).all()  # the two maps give distinguishable results
    assert np.allclose(res.score, np.where(used == 1, alone[1].score, alone[2].score), atol=1e-5)
    again = refine(starts(ps, ps.quat, ps.shift_A), ref, **kw)
    assert np.array_equal(again.score, res.score)
    # the reconstruction's half-maps: half-set h (given or by uid) and nothing else
    maps = reconstruct(ps, halves=True, progress=False)
    for h in (1, 2):
        alone = reconstruct(ps.subset(used == h), progress=False)["full"]
        assert np.allclose(maps[f"half{h}"], alone, atol=1e-5 * np.abs(alone).max())


def test_reference_resampling_and_incompatible_references(asym):
    ps = asym["ps"].subset(np.arange(16))
    vol, apix = asym["vol"], asym["apix"]
    kw = {"global_search": "none", "start_error_deg": np.full(16, 5.0), "progress": False}
    start = starts(ps, rotate_by(ps.quat, 5.0, np.random.default_rng(8)))
    base = refine(start, vol, reference_pixel_size=apix, **kw)
    # the same map at half the pixel size on a 128 px grid: resampled to the particles' grid
    fine = resample(torch.tensor(vol), 128, 3).numpy()
    res = refine(start, fine, reference_pixel_size=apix / 2, **kw)
    assert np.median(errors_deg(res, ps)) < 1.5
    assert np.max(np.abs(res.score - base.score)) < 0.02
    # a larger box at the same pixel size is cropped in real space
    padded = np.pad(vol, 8)
    res = refine(start, padded, reference_pixel_size=apix, **kw)
    assert np.median(errors_deg(res, ps)) < 1.5
    with pytest.raises(CryoforumError, match="cannot be resampled"):
        refine(start, vol, reference_pixel_size=apix * 10.5 / 64, **kw)  # would need a 10.5 px box
    with pytest.raises(CryoforumError, match="cubic"):
        refine(start, vol[:, :, :60], reference_pixel_size=apix, **kw)
    with pytest.raises(CryoforumError, match="half2"):
        refine(start, {"half1": vol}, reference_pixel_size=apix, **kw)


@pytest.mark.relion
def test_refines_held_out_relion_particles(relion_set):
    """relion_project particles (CTF, SNR 0.1, shifts up to 3 px): 60 held out, the reference reconstructed from
    the other 340 at their true poses; from 15° starts with unknown shifts."""
    ps = read_star(relion_set["dir"] / "parts_noisy.star")
    apix = relion_set["pixel_size"]
    test, other = ps.subset(np.arange(60)), ps.subset(np.arange(60, len(ps)))
    maps = reconstruct(other, halves=True, progress=False)
    truth = dataclasses.replace(test, quat=relion_set["quat"][:60], shift_A=relion_set["shift_A"][:60])
    start = starts(test, rotate_by(truth.quat, 15.0, np.random.default_rng(9)))
    res = refine(start, {"half1": maps["half1"], "half2": maps["half2"]}, reference_pixel_size=apix,
                 global_search="none", start_error_deg=np.full(60, 15.0), progress=False)
    err, serr = errors_deg(res, truth), shift_errors_px(res, truth)
    assert np.mean(err < 5) >= 0.9 and np.median(err) < 2.5, (np.median(err), np.mean(err < 5))
    assert np.median(serr) < 0.4, np.median(serr)


def test_stack_reads_run_one_batch_ahead_in_order():
    """The refinement reads the next batch's images in a background thread while the current one is scored: the
    batches come in order with their own images, and no read runs more than one batch ahead."""
    import threading
    import types

    from cryoforum_plugin.refine.driver import _read_ahead

    log, main = [], threading.get_ident()

    def read_images(reader, rows):
        log.append(("read", int(rows[0]), threading.get_ident() != main))
        return np.full((len(rows), 2, 2), float(rows[0]))

    polls = []
    job = types.SimpleNamespace(ps=types.SimpleNamespace(read_images=read_images), reader=None,
                                abort_check=lambda: polls.append(1))
    batches = [np.arange(lo, lo + 3) for lo in range(0, 12, 3)]
    for rows, images in _read_ahead(job, batches):
        log.append(("score", int(rows[0]), False))
        assert np.all(images == rows[0]) and images.shape == (3, 2, 2)
        reads = [r for kind, r, _ in log if kind == "read"]
        assert max(reads) <= rows[0] + 3  # at most the next batch has been read (or is being read)
    order = [(kind, r) for kind, r, _ in log]
    assert [r for kind, r in order if kind == "score"] == [0, 3, 6, 9] and len(polls) == 4
    assert [r for kind, r in order if kind == "read"] == [0, 3, 6, 9]
    assert [background for kind, r, background in log if kind == "read"] == [False, True, True, True]
