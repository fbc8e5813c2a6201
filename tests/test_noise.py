"""Noise spectra of particles (noise.py): residual estimate against the map, background fallback, NoiseModel."""

import json

import numpy as np
import pytest
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.physics.fourier import as_tensor
from cryoforum_plugin.physics.resample import resample
from cryoforum_plugin.formats.mrc import StackWriter, read_map
from cryoforum_plugin.physics.noise import (
    NoiseModel, background_noise_spectrum, estimate_noise_spectrum, lorentzian_with_bump, radial_power,
    relative_spectrum,
)
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.physics.projector import Projector

BOX, N = 32, 600


def true_shape(k):  # per-pixel relative power of the test's noise; k in cycles per box (continuous)
    return 1.0 / (1.0 + (k / 4.0) ** 2) + 0.1 + 0.5 * np.exp(-((k - 11.0) ** 2) / 4.0)


def numpy_coloured_noise(n, box, sigma2, rng):
    """Independent of noise.py: numpy FFT on the uncentred grid, filter by the continuous shape."""
    f = np.fft.fftfreq(box) * box
    k = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    amp = np.sqrt(sigma2 * true_shape(k))
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, box, box))) * amp).real.astype(np.float32)


def true_shell_spectrum(box, sigma2):
    f = np.arange(box) - box // 2
    k = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    shell = np.round(k).astype(int)
    return np.array([(sigma2 * true_shape(k[shell == s])).mean() for s in range(box // 2 + 1)])


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    rng = np.random.default_rng(7)
    raw, apix64 = read_map(DEFAULT_MAP)
    vol = resample(as_tensor(raw), BOX, 3)
    apix = apix64 * raw.shape[0] / BOX
    quat = rotations.random_quats(N, rng)
    shift = rng.uniform(-10, 10, (N, 2))
    du = rng.uniform(10000, 25000, N)
    ctf = {"defocus_u": du, "defocus_v": du - rng.uniform(0, 500, N), "defocus_angle": rng.uniform(0, 180, N),
           "voltage": np.full(N, 300.0), "cs": np.full(N, 2.7), "amp_contrast": np.full(N, 0.1),
           "phase_shift": np.zeros(N)}
    clean = Projector(vol).project(quat, as_tensor(shift / apix), ctf_images(ctf, np.arange(N), BOX, apix))
    clean = -3.0 * clean.numpy()  # images have their own scale and contrast sign
    signal_var = clean.var(axis=(1, 2)).mean()
    snr = 0.2
    shape_mean = true_shell_spectrum(BOX, 1.0)  # normalise the colour to the noise level snr asks for
    f = np.arange(BOX) - BOX // 2
    grid_mean = true_shape(np.hypot(*np.meshgrid(f, f, indexing="ij"))).mean()
    sigma2 = signal_var / snr / grid_mean
    images = clean + numpy_coloured_noise(N, BOX, sigma2, rng)
    path = tmp_path_factory.mktemp("noise") / "p.mrcs"
    w = StackWriter(path, N, BOX, apix)
    w.write(images)
    w.close()
    ps = ParticleSet(image_path=np.array([str(path)] * N, dtype=object), image_index=np.arange(N), quat=quat,
                     shift_A=shift, pixel_size=np.full(N, apix), box=np.full(N, BOX), ctf=ctf,
                     optics_group=np.ones(N, np.int64), half_set=np.ones(N, np.int64),
                     uid=np.arange(N, dtype=np.uint64))
    return {"ps": ps, "vol": vol, "raw": raw, "apix64": apix64, "images": images, "apix": apix,
            "true": true_shell_spectrum(BOX, sigma2), "snr": float(signal_var / (sigma2 * grid_mean)),
            "shape_mean": shape_mean}


def test_residual_estimate_recovers_a_coloured_spectrum_and_the_snr(particles):
    est = estimate_noise_spectrum(particles["ps"], particles["vol"] * 0.37, batch=200)
    true = particles["true"]
    rel = np.abs(est.spectrum / true - 1)
    assert est.box == BOX and abs(est.pixel_size - particles["apix"]) < 1e-6
    assert np.median(rel) < 0.06 and (rel < 0.15).mean() >= 0.9, rel
    white = np.full_like(true, est.noise_variance)  # a white model of the same level is far off
    assert (np.abs(white / true - 1) > 0.15).mean() > 0.5
    assert abs(est.snr / particles["snr"] - 1) < 0.1, (est.snr, particles["snr"])
    assert est.signal_spectrum[1] > 10 * est.signal_spectrum[-1]  # the signal is low-pass
    # the full-size map with its own pixel size gives the same answer (resampled to the particles' grid)
    est64 = estimate_noise_spectrum(particles["ps"], particles["raw"], map_pixel_size=particles["apix64"],
                                    max_particles=200)
    assert np.median(np.abs(est64.spectrum / true - 1)) < 0.1


def test_background_fallback_roughly_agrees(particles):
    bg = background_noise_spectrum(particles["images"], radius=12.0)
    rel = np.abs(bg / particles["true"] - 1)
    assert bg.shape == (BOX // 2 + 1,)
    assert np.median(rel[2:]) < 0.2, rel


def test_model_samples_whitens_resamples_and_round_trips():
    k = BOX // 2 + 1
    spec = true_shell_spectrum(BOX, 2.0)
    model = NoiseModel(spec, np.linspace(1, 0, k), 0.3, 4.0, BOX)
    g = torch.Generator().manual_seed(0)
    x = model.sample(2000, g)
    assert x.shape == (2000, BOX, BOX) and x.dtype == torch.float32
    assert np.abs(radial_power(x).numpy() / spec - 1).max() < 0.1
    assert abs(float(x.var()) / model.noise_variance - 1) < 0.02
    from cryoforum_plugin.physics.fourier import fft2c, ifft2c
    w = ifft2c(fft2c(x) * model.whitening_filter()).real
    assert np.abs(radial_power(w).numpy() - 1).max() < 0.1
    assert torch.equal(model.sample(3, torch.Generator().manual_seed(5)), model.sample(3, torch.Generator().manual_seed(5)))
    # Fourier-cropping the noise to 16 px (8 Å) matches the resampled model (but at Nyquist, where the crop
    # leaves unpaired coefficients)
    small = model.resampled(16, 8.0)
    assert np.abs(radial_power(resample(x, 16, 2)).numpy()[:-1] / small.spectrum[:-1] - 1).max() < 0.1
    back = NoiseModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert np.array_equal(back.spectrum, model.spectrum) and np.array_equal(back.signal_spectrum, model.signal_spectrum)
    assert (back.snr, back.pixel_size, back.box) == (0.3, 4.0, BOX)
    unknown = NoiseModel(spec, np.zeros(k), float("nan"), 4.0, BOX)
    d = json.loads(json.dumps(unknown.to_dict(), allow_nan=False))
    assert d["snr"] is None and np.isnan(NoiseModel.from_dict(d).snr)
    with pytest.raises(ValueError):
        NoiseModel(spec[:-1], spec[:-1], 1.0, 4.0, BOX)


def test_relative_spectrum_forms():
    s = relative_spectrum(lorentzian_with_bump(), 64, 4.0)
    assert s.shape == (33,) and s[0] > 5 * s[-1]
    from cryoforum_plugin.physics.noise import spectrum_2d
    assert abs(float(spectrum_2d(s, 64).double().mean()) - 1) < 1e-6
    assert np.allclose(relative_spectrum(np.ones(33), 64, 4.0), 1)
    with pytest.raises(ValueError):
        relative_spectrum(np.ones(10), 64, 4.0)


def test_simulate_with_coloured_noise_keeps_the_level(tmp_path):
    import mrcfile
    import starfile

    from cryoforum_plugin.sim.dataset import simulate

    shape = lorentzian_with_bump()
    res = simulate(DEFAULT_MAP, tmp_path / "c", n=300, box=BOX, snr=0.5, junk_fraction=0.5, seed=3,
                   noise_spectrum=shape, progress=False)
    junk = starfile.read(tmp_path / "c" / "truth.star")["particles"]["rlnCryoforumJunk"].to_numpy()
    noise_only = torch.from_numpy(mrcfile.read(tmp_path / "c" / "particles.mrcs")[junk == 1].copy())
    assert abs(float((noise_only**2).mean()) / res.noise_std**2 - 1) < 0.05  # same total noise variance
    want = relative_spectrum(shape, BOX, res.pixel_size) * res.noise_std**2
    assert np.median(np.abs(radial_power(noise_only).numpy() / want - 1)) < 0.1
    assert want[0] > 3 * want[-1]  # and the colour is far from white
