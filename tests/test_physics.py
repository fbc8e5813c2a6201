"""CPU self-consistency of the physics core without RELION (the RELION agreement is test_relion_agreement.py):
projection then back-projection returns the map, the CTF's zeros sit where the formula puts them, FSC of a map
with itself is 1 and of independent noise is about 0, and shifts move images the documented way."""

import numpy as np
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.ctf import ctf_images, electron_wavelength
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.physics.fourier import fft2c, ifft2c, shift_phase
from cryoforum_plugin.physics.fsc import fsc_curve, resolution
from cryoforum_plugin.physics.projector import Backprojector, Projector
from cryoforum_plugin.physics.resample import resized_map


def test_projection_then_back_projection_returns_the_map():
    vol, apix = resized_map(DEFAULT_MAP, 32)
    quats = rotations.random_quats(1500, np.random.default_rng(0))
    images = Projector(vol).project(quats)
    bp = Backprojector(32)
    bp.insert(images, quats)
    rec = bp.reconstruct().numpy()
    curve = fsc_curve(rec, vol.numpy())
    assert curve[:12].min() > 0.95, curve[:12]
    assert np.corrcoef(rec.ravel(), vol.numpy().ravel())[0, 1] > 0.95
    # a transposed pose convention reconstructs something else
    bad = Backprojector(32)
    bad.insert(images, rotations.quat_conj(quats))
    bad_curve = fsc_curve(bad.reconstruct().numpy(), vol.numpy())
    assert bad_curve[4:12].mean() < 0.5, bad_curve[:12]


def test_ctf_zeros_are_where_the_formula_puts_them():
    box, apix, defocus = 128, 1.0, 15000.0
    ctf = {"defocus_u": np.array([defocus]), "defocus_v": np.array([defocus]), "defocus_angle": np.zeros(1),
           "voltage": np.array([300.0]), "cs": np.zeros(1), "amp_contrast": np.zeros(1), "phase_shift": np.zeros(1)}
    c = ctf_images(ctf, [0], box, apix)[0].numpy()
    lam = float(electron_wavelength(300.0))
    # without Cs and amplitude contrast: CTF = -sin(-π λ Δf s²) vanishes at s_n = sqrt(n / (λ Δf))
    row = c[box // 2, box // 2:]  # along +x, index k = frequency k / (box apix)
    s = np.arange(len(row)) / (box * apix)
    for n in (1, 2, 3):
        s_n = np.sqrt(n / (lam * defocus))
        k = s_n * box * apix
        lo, hi = int(np.floor(k)), int(np.ceil(k))
        assert np.sign(row[lo]) != np.sign(row[hi]) or abs(row[lo]) < 0.05, (n, row[lo], row[hi])
    assert abs(row[0]) < 1e-6 and np.isclose(np.abs(c).max(), 1.0, atol=1e-3)
    assert np.allclose(s[1], 1 / (box * apix))


def test_fsc_of_identical_and_of_independent_maps():
    rng = np.random.default_rng(1)
    vol, apix = resized_map(DEFAULT_MAP, 32)
    v = vol.numpy()
    assert np.allclose(fsc_curve(v, v), 1.0, atol=1e-6)
    a, b = rng.normal(size=(32, 32, 32)), rng.normal(size=(32, 32, 32))
    curve = fsc_curve(a, b)
    assert np.abs(curve[3:]).max() < 0.25
    assert resolution(fsc_curve(v, v), 32, apix, 0.143) <= 2 * apix + 1e-6  # identical maps: Nyquist


def test_shift_moves_the_image_by_minus_the_origin():
    img = torch.zeros(1, 32, 32)
    img[0, 16, 16] = 1.0
    origin = torch.tensor([[3.0, -2.0]])  # RELION origin (x, y): the particle sits at centre - origin
    moved = ifft2c(fft2c(img) * shift_phase(origin, 32, +1.0)).real[0]
    y, x = np.unravel_index(int(moved.argmax()), moved.shape)
    assert (x, y) == (16 - 3, 16 + 2)


def _delta_map(shape) -> np.ndarray:
    """A map of ``shape`` with a single 1 at its centre voxel (index s // 2 on every axis, RELION's FFT centre)."""
    vol = np.zeros(shape, np.float32)
    vol[tuple(s // 2 for s in shape)] = 1.0
    return vol


def test_odd_and_non_cubic_maps_keep_their_centre_voxel_at_the_centre(tmp_path):
    """read_map pads odd or non-cubic maps to an even cube around the centre voxel: the voxel at s // 2 lands at
    n // 2 of the cube (was one voxel off per odd axis: (n - s) // 2 instead of n // 2 - s // 2). The real-space
    pad/crop of fourier.py keeps the same convention for odd sizes."""
    from cryoforum_plugin.physics.fourier import pad_real
    from cryoforum_plugin.formats.mrc import read_map, write_mrc

    for shape in [(33, 33, 33), (31, 25, 29), (32, 27, 30)]:
        write_mrc(tmp_path / "m.mrc", _delta_map(shape), 1.5)
        vol, apix = read_map(tmp_path / "m.mrc")
        n = vol.shape[0]
        assert vol.shape == (n, n, n) and n % 2 == 0 and apix == 1.5, (shape, vol.shape)
        assert np.unravel_index(int(vol.argmax()), vol.shape) == (n // 2,) * 3, shape
        assert vol.sum() == 1.0
    for old, new in [(33, 34), (33, 40), (34, 33), (35, 31)]:
        padded = pad_real(torch.from_numpy(_delta_map((old,) * 3)), new, 3).numpy()
        assert np.unravel_index(int(padded.argmax()), padded.shape) == (new // 2,) * 3, (old, new)
