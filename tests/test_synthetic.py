"""Synthetic particles from a map (synthetic.py): SNR and noise colour as asked, pose convention, CTF pool,
determinism, SNR schedule."""

import numpy as np
import pytest
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.physics.fourier import as_tensor
from cryoforum_plugin.physics.resample import resample
from cryoforum_plugin.formats.mrc import read_map
from cryoforum_plugin.physics.noise import NoiseModel, estimate_noise_spectrum, lorentzian_with_bump, relative_spectrum
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.sim.batches import MapParticleSimulator, snr_at

BOX = 32


@pytest.fixture(scope="module")
def setup():
    raw, apix64 = read_map(DEFAULT_MAP)
    vol = resample(as_tensor(raw), BOX, 3)
    apix = apix64 * raw.shape[0] / BOX
    rng = np.random.default_rng(3)
    m = 40
    du = rng.uniform(8000, 30000, m)
    pool = {"defocus_u": du, "defocus_v": du - rng.uniform(0, 500, m), "defocus_angle": rng.uniform(0, 180, m),
            "voltage": np.full(m, 300.0), "cs": np.full(m, 2.7), "amp_contrast": np.full(m, 0.1),
            "phase_shift": np.zeros(m)}
    shifts = rng.uniform(-12, 12, (m, 2))
    spec = 2.5 * relative_spectrum(lorentzian_with_bump(k0=1 / 60, bump_at=1 / 25, bump_width=1 / 150), BOX, apix)
    noise = NoiseModel(spec, np.zeros_like(spec), 0.25, apix, BOX)
    return {"vol": vol, "apix": apix, "pool": pool, "shifts": shifts, "noise": noise}


def as_particles(params, pool, apix, n):
    return ParticleSet(image_path=np.array(["mem"] * n, dtype=object), image_index=np.arange(n),
                       quat=params["quat"], shift_A=params["shift_A"], pixel_size=np.full(n, apix),
                       box=np.full(n, BOX), ctf={k: v[params["ctf_rows"]] for k, v in pool.items()},
                       optics_group=np.ones(n, np.int64), half_set=np.ones(n, np.int64),
                       uid=np.arange(n, dtype=np.uint64))


@pytest.mark.parametrize("per_image", [True, False])
def test_output_has_the_snr_and_noise_spectrum_asked(setup, per_image):
    sim = MapParticleSimulator(setup["vol"], setup["apix"], ctf_pool=setup["pool"], shift_pool_A=setup["shifts"],
                               noise=setup["noise"], per_image_snr=per_image)
    n = 600
    img, quats, params = sim.batch(n, torch.Generator().manual_seed(1), return_params=True)
    assert img.shape == (n, BOX, BOX) and img.dtype == torch.float32 and quats.shape == (n, 4)
    assert quats.dtype == torch.float32 and np.allclose(params["snr"], 0.25)
    est = estimate_noise_spectrum(as_particles(params, setup["pool"], setup["apix"], n), setup["vol"], images=img)
    rel = np.abs(est.spectrum / setup["noise"].spectrum - 1)
    assert np.median(rel) < 0.06 and (rel < 0.15).mean() >= 0.9, rel
    assert abs(est.snr / 0.25 - 1) < 0.1, est.snr
    # snr_scale multiplies the SNR; the noise level stays the data's
    img2, _, p2 = sim.batch(n, torch.Generator().manual_seed(1), snr_scale=4.0, return_params=True)
    est2 = estimate_noise_spectrum(as_particles(p2, setup["pool"], setup["apix"], n), setup["vol"], images=img2)
    assert abs(est2.snr / 1.0 - 1) < 0.1 and abs(est2.noise_variance / est.noise_variance - 1) < 0.05


def correlation(a, b):
    a = a - a.mean((-2, -1), keepdim=True)
    b = b - b.mean((-2, -1), keepdim=True)
    return ((a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))).numpy()


def test_images_follow_the_projector_pose_convention_and_the_ctf_pool(setup):
    pool = {k: v[:2].copy() for k, v in setup["pool"].items()}
    pool["defocus_u"][:] = [6000.0, 30000.0]
    pool["defocus_v"][:] = pool["defocus_u"]
    sim = MapParticleSimulator(setup["vol"], setup["apix"], ctf_pool=pool, shift_pool_A=setup["shifts"],
                               noise=setup["noise"], snr=20.0)
    n = 64
    img, quats, p = sim.batch(n, torch.Generator().manual_seed(2), return_params=True)
    assert set(p["ctf_rows"].tolist()) <= {0, 1} and len(set(p["ctf_rows"].tolist())) == 2
    assert np.allclose(quats.numpy(), p["quat"], atol=1e-6)
    assert set(map(tuple, p["shift_A"])) <= set(map(tuple, setup["shifts"]))
    proj = Projector(setup["vol"])

    def ref(q, rows):
        return proj.project(q, as_tensor(p["shift_A"] / setup["apix"]), ctf_images(pool, rows, BOX, setup["apix"]))

    right = correlation(img, ref(quats.double().numpy(), p["ctf_rows"]))
    transposed = correlation(img, ref(rotations.quat_conj(quats.double().numpy()), p["ctf_rows"]))
    wrong_ctf = correlation(img, ref(quats.double().numpy(), 1 - p["ctf_rows"]))
    assert np.median(right) > 0.9, np.median(right)
    assert np.median(transposed) < np.median(right) - 0.3
    assert np.median(wrong_ctf) < np.median(right) - 0.3


def test_deterministic_with_a_seeded_generator_and_log_uniform_snr(setup):
    kw = dict(ctf_pool=setup["pool"], shift_pool_A=setup["shifts"], noise=setup["noise"], snr=(0.01, 1.0))
    a = MapParticleSimulator(setup["vol"], setup["apix"], **kw).batch(300, torch.Generator().manual_seed(9),
                                                                       return_params=True)
    b = MapParticleSimulator(setup["vol"], setup["apix"], **kw).batch(300, torch.Generator().manual_seed(9),
                                                                       return_params=True)
    c = MapParticleSimulator(setup["vol"], setup["apix"], **kw).batch(300, torch.Generator().manual_seed(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    snr = a[2]["snr"]
    assert snr.min() >= 0.01 and snr.max() <= 1.0
    assert abs(np.median(np.log10(snr)) + 1) < 0.2  # log-uniform: median at the geometric mean 0.1
    # a pool of orientations is sampled from; quats are unit (w, x, y, z)
    pool_q = rotations.random_quats(5, np.random.default_rng(0))
    s = MapParticleSimulator(setup["vol"], setup["apix"], orientations=pool_q, snr=1.0)
    _, q = s.batch(20, torch.Generator().manual_seed(0))
    assert np.allclose(np.linalg.norm(q.numpy(), axis=1), 1, atol=1e-5)
    assert (rotations.geodesic(q.double().numpy()[:, None], pool_q[None]).min(1) < 1e-3).all()


def test_snr_schedule_and_validation(setup):
    assert snr_at(0, 1.0, 0.01) == 1.0 and abs(snr_at(1, 1.0, 0.01) - 0.01) < 1e-12
    assert abs(snr_at(0.5, 1.0, 0.01) - 0.1) < 1e-12 and snr_at(2, 1.0, 0.01) == snr_at(1, 1.0, 0.01)
    with pytest.raises(ValueError):  # SNR from a model that does not know it
        MapParticleSimulator(setup["vol"], setup["apix"], noise=NoiseModel(np.ones(17), np.ones(17), float("nan"),
                                                                           setup["apix"], BOX))
    # a box smaller than the map: the noise model follows to the new grid
    sim = MapParticleSimulator(setup["vol"], setup["apix"], noise=setup["noise"], box=16)
    img, _ = sim.batch(4, torch.Generator().manual_seed(0))
    assert img.shape == (4, 16, 16) and sim.noise.box == 16 and abs(sim.pixel_size - 2 * setup["apix"]) < 1e-6
