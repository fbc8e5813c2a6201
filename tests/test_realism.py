"""Realistic particles (issue 21, sim/realism.py and sim/junk.py): each physical idea recovered from what the
simulator writes: the noise colour and micrograph levels from empty images, RELION's normalisation (against
relion_preprocess where installed), B-factor envelopes, preferred views and the view density, every junk kind with
the property that defines it, and the --realistic preset."""

import json
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryoforum_plugin import manifest
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.formats.star import read_star
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fourier import as_tensor, fft2c, grid_2d, pad_real, radius_2d
from cryoforum_plugin.physics import noise
from cryoforum_plugin.physics.noise import radial_power
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.physics.resample import resized_map
from cryoforum_plugin.sim import realism
from cryoforum_plugin.sim.dataset import simulate
from cryoforum_plugin.sim.junk import JUNK_KINDS, JunkMaker, particle_radius_px

BOX = 32


def stack_and_truth(d):
    return (torch.from_numpy(np.array(mrcfile.read(d / "particles.mrcs"))), starfile.read(d / "truth.star")["particles"],
            json.loads((d / "simulation.json").read_text()))


def test_noise_colour_and_micrograph_levels_are_recovered_from_empty_images(tmp_path):
    """Pure-noise particles of a coloured set: divided by their micrograph's level, their radial power is the asked
    spectrum (floor + (1 - floor)·exp(-B s²/4), unit variance × noise std²) within 12 % in every shell; each
    image's noise std follows its micrograph's level."""
    simulate(DEFAULT_MAP, tmp_path / "s", n=400, box=BOX, snr=0.5, junk_fraction=0.5, junk_kinds="noise",
             noise_bfactor=800.0, noise_floor=0.1, particles_per_micrograph=50, micrograph_sigma=0.3, seed=2,
             progress=False)
    x, truth, meta = stack_and_truth(tmp_path / "s")
    empty = truth["rlnCryoforumJunk"].to_numpy() == 1
    names = truth["rlnMicrographName"].to_numpy()
    levels = np.asarray(meta["realism"]["micrograph_levels"])
    mic = np.array([int(n[-9:-4]) - 1 for n in names])
    assert len(levels) == 8 and (np.bincount(mic) == 50).all() and levels.std() > 0.1
    per_image = x[empty] / as_tensor(levels[mic[empty]])[:, None, None]
    measured = radial_power(per_image).numpy()[1:]
    asked = meta["noise_std"] ** 2 * realism.noise_spectrum(BOX, meta["pixel_size_A"], 800.0, 0.1)[1:]
    assert np.abs(measured / asked - 1).max() < 0.12
    assert measured[-1] / measured[0] < 0.7  # coloured: it falls with frequency (to 0.57 at this Nyquist)
    ratio = x[empty].std(dim=(1, 2)).numpy() / meta["noise_std"] / levels[mic[empty]]
    assert abs(np.median(ratio) - 1) < 0.1 and np.corrcoef(x[empty].std(dim=(1, 2)).numpy(),
                                                          levels[mic[empty]])[0, 1] > 0.9


def test_ice_background_is_a_smooth_unit_variance_field_that_does_not_wrap():
    gen = torch.Generator().manual_seed(0)
    field = realism.ice_background(300, BOX, 8.7, 100.0, gen)
    assert 0.8 < float(field.var()) < 1.2
    power = radial_power(field).numpy()
    assert power[6:].max() < 1e-3 * power[:2].sum()  # smooth: no power past a few shells
    left, right, next_col = field[:, :, 0].reshape(-1), field[:, :, -1].reshape(-1), field[:, :, 1].reshape(-1)
    assert np.corrcoef(left, next_col)[0, 1] > 0.9
    assert abs(np.corrcoef(left, right)[0, 1]) < 0.3  # a periodic field would join its edges


def _ramped(n=6, seed=0):
    rng = np.random.default_rng(seed)
    ky, kx = (g.numpy() for g in grid_2d(BOX))
    return np.stack([rng.normal(3, 1) + rng.normal(0, 0.2) * kx + rng.normal(0, 0.2) * ky + rng.normal(0, 2, kx.shape)
                     + 10 * np.exp(-(kx**2 + ky**2) / 20) for _ in range(n)]).astype(np.float32)


def test_relion_normalisation_zeroes_the_background_ramp_mean_and_unit_std():
    x = noise.relion_normalise(torch.from_numpy(_ramped()), 12.0)
    bg = radius_2d(BOX) > 12.0
    v = x[:, bg].double()
    assert v.mean(1).abs().max() < 1e-5 and (v.std(1, correction=0) - 1).abs().max() < 1e-5
    ky, kx = grid_2d(BOX)
    for coord in (kx[bg], ky[bg]):  # no gradient left in the background
        assert (v * coord.double()).mean(1).abs().max() < 1e-4


@pytest.mark.skipif(shutil.which("relion_preprocess") is None, reason="RELION is not installed")
def test_relion_normalisation_equals_relion_preprocess(tmp_path):
    images = _ramped(seed=1)
    with mrcfile.new(tmp_path / "in.mrcs", images) as m:
        m.voxel_size = 2.0
    subprocess.run(["relion_preprocess", "--operate_on", "in.mrcs", "--operate_out", "out.mrcs", "--norm",
                    "--bg_radius", "12"], cwd=tmp_path, check=True, capture_output=True)
    relion = mrcfile.read(tmp_path / "out.mrcs")
    ours = noise.relion_normalise(torch.from_numpy(images), 12.0).numpy()
    assert np.abs(ours - relion).max() < 1e-4 * np.abs(relion).max()


def test_normalised_particles_have_background_mean_0_std_1_and_varying_snr(tmp_path):
    simulate(DEFAULT_MAP, tmp_path / "n", n=120, box=BOX, snr=0.2, normalise=True, particles_per_micrograph=20,
             micrograph_sigma=0.4, ice_std=0.5, seed=3, progress=False)
    x, _, meta = stack_and_truth(tmp_path / "n")
    assert meta["realism"]["bg_radius_px"] == 0.375 * BOX  # RELION's default: 75 % of the box
    v = x[:, radius_2d(BOX) > 0.375 * BOX].double()
    assert v.mean(1).abs().max() < 1e-4 and (v.std(1, correction=0) - 1).abs().max() < 1e-3
    ps = read_star(tmp_path / "n" / "particles.star")  # the signal left after normalisation varies per micrograph
    vol, apix = resized_map(DEFAULT_MAP, BOX)
    p = Projector(vol).project(ps.quat, None, ctf_images(ps.ctf, np.arange(len(ps)), BOX, apix))
    amp = ((x * p).sum((1, 2)) / (p * p).sum((1, 2))).numpy()  # least-squares scale of the projection
    levels = np.asarray(meta["realism"]["micrograph_levels"])[np.arange(len(ps)) // 20]
    assert np.corrcoef(amp, 1 / levels)[0, 1] > 0.7


def test_bfactor_envelope_multiplies_the_signal_by_exp_minus_b_s2_over_4(tmp_path):
    for name, b in (("b0", 0.0), ("b300", 300.0)):
        simulate(DEFAULT_MAP, tmp_path / name, n=40, box=BOX, snr=0, no_ctf=True, bfactor_min=b, bfactor_max=b,
                 seed=4, progress=False)
    x0, x1 = (stack_and_truth(tmp_path / name)[0] for name in ("b0", "b300"))
    apix = json.loads((tmp_path / "b0" / "simulation.json").read_text())["pixel_size_A"]
    s2 = (np.arange(BOX // 2 + 1) / (BOX * apix)) ** 2
    ratio = (radial_power(x1) / radial_power(x0)).numpy()[1:-2]
    assert np.abs(ratio / np.exp(-300 * s2[1:-2] / 2) - 1).max() < 0.02  # power: the envelope squared
    star = starfile.read(tmp_path / "b300" / "particles.star")["particles"]
    assert np.allclose(star["rlnCtfBfactor"], 300.0)
    assert "rlnCtfBfactor" not in starfile.read(tmp_path / "b0" / "particles.star")["particles"]


def test_preferred_views_put_the_asked_fraction_in_the_clusters_and_rare_views_have_low_density(tmp_path):
    width = 8.0
    simulate(DEFAULT_MAP, tmp_path / "p", n=400, box=BOX, snr=1.0, preferred_views=0.6, view_clusters=3,
             view_width=width, seed=5, progress=False)
    _, truth, meta = stack_and_truth(tmp_path / "p")
    centres = np.asarray(meta["realism"]["preferred_views"]["centres"])
    quat = read_star(tmp_path / "p" / "truth.star").quat
    angle = np.degrees(np.arccos(np.clip(rotations.viewing_direction(quat) @ centres.T, -1, 1))).min(1)
    near = angle < 3 * width
    u = np.random.default_rng(0).standard_normal((200000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    uniform_near = (np.degrees(np.arccos(np.clip(u @ centres.T, -1, 1))).min(1) < 3 * width).mean()
    expected = 0.6 * (1 - np.exp(-4.5)) + 0.4 * uniform_near  # P(vMF angle < 3σ) = 1 - e^{-9/2}
    assert abs(near.mean() - expected) < 0.08
    density = truth["rlnCryoforumViewDensity"].to_numpy()
    assert np.median(density[angle < width]) > 4 * np.median(density[angle > 45])
    rarest = density <= np.quantile(density, 0.1)
    assert (angle[rarest] > 30).mean() > 0.9  # the rarest 10 % are the views far from the dominant ones


def test_view_density_of_uniform_views_is_about_one():
    d = realism.view_density(rotations.random_quats(3000, np.random.default_rng(1)))
    assert 0.85 < np.median(d) < 1.15 and np.percentile(d, 5) > 0.5


def _coherence(x: torch.Tensor) -> np.ndarray:
    """(B,) orientation coherence of each image's gradients, (λ1 - λ2) / (λ1 + λ2) of the structure tensor summed
    over the image (finite differences, no wrap round): 1 when every gradient is parallel (a straight edge)."""
    gx, gy = x[:, 1:-1, 2:] - x[:, 1:-1, :-2], x[:, 2:, 1:-1] - x[:, :-2, 1:-1]
    jxx, jyy, jxy = (gx * gx).sum((1, 2)), (gy * gy).sum((1, 2)), (gx * gy).sum((1, 2))
    return (torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy)).numpy()


def test_each_junk_kind_is_labelled_and_has_its_defining_property(tmp_path):
    kinds = "ice,crystal,carbon,aggregate,neighbour,empty,off-centre"
    simulate(DEFAULT_MAP, tmp_path / "j", n=300, box=BOX, snr=0, junk_fraction=0.6, junk_kinds=kinds, seed=6,
             progress=False)
    x, truth, meta = stack_and_truth(tmp_path / "j")
    junk = truth["rlnCryoforumJunk"].to_numpy()
    names = {name: k for k, name in JUNK_KINDS.items()}
    assert (junk > 0).sum() == 180 and meta["realism"]["junk_kinds"] == kinds.split(",")
    assert all((junk == names[k]).sum() >= 10 for k in kinds.split(","))
    ps = read_star(tmp_path / "j" / "particles.star")
    vol, apix = resized_map(DEFAULT_MAP, BOX)
    p = Projector(vol).project(ps.quat, as_tensor(ps.shift_A / apix), ctf_images(ps.ctf, np.arange(len(ps)), BOX, apix))
    cc = ((x * p).sum((1, 2)) / ((x * x).sum((1, 2)) * (p * p).sum((1, 2))).sqrt()).numpy()
    energy = (x * x).sum((1, 2)).numpy()
    rest = ((x - p) ** 2).sum((1, 2)).numpy() / (p * p).sum((1, 2)).numpy()
    power = fft2c(x).abs() ** 2
    power[:, BOX // 2, BOX // 2] = 0
    peak_share = (power.flatten(1).amax(1) / power.sum((1, 2))).numpy()
    coherence = _coherence(x)

    def kind(name):
        return junk == names[name]

    good = junk == 0
    assert cc[good].min() > 0.999  # no noise: a good particle is its projection
    assert (energy[kind("ice")] > 5 * energy[good].mean()).all() and (cc[kind("ice")] < 0.5).all()
    assert (peak_share[kind("crystal")] > 2 * peak_share[good].max()).all()  # Bragg peaks of the lattice
    assert (coherence[kind("carbon")] > 0.9).all() and coherence[good].max() < 0.8  # a straight edge
    residual = ((x - p) ** 2).numpy()  # what is there besides the particle, and where
    ky, kx = (g.numpy() for g in grid_2d(BOX))
    centroid = np.hypot((residual * kx).sum((1, 2)), (residual * ky).sum((1, 2))) / residual.sum((1, 2)).clip(1e-30)
    radius = meta["realism"]["particle_radius_px"]
    for name in ("aggregate", "neighbour"):  # the particle plus a second one, about a diameter away or at the edge
        m = kind(name)
        assert (cc[m] > 0.5).all() and (cc[m] < 0.9995).all() and (rest[m] > 1e-3).all()
        assert (centroid[m] > 0.7 * radius).all()
    assert (cc[kind("empty")] < 0.6).all() and (energy[kind("empty")] < 0.5 * energy[good].mean()).all()
    assert (cc[kind("off-centre")] < 0.5).all()


def test_a_second_particle_is_a_projection_moved_by_about_one_diameter_without_wrapping():
    vol, _ = resized_map(DEFAULT_MAP, BOX)
    projector = Projector(vol)
    junk = np.array([7] * 6 + [8] * 6)
    maker = JunkMaker(junk, projector, particle_radius_px(vol), 1.0, np.random.default_rng(7))
    rows = np.arange(len(junk))
    second = maker.apply(torch.zeros(len(rows), BOX, BOX), rows, lambda r, size: None)
    big = Projector(pad_real(vol, 3 * BOX, 3))  # the same map in a box 3x larger: nothing can wrap round there
    moved = pad_real(big.project(maker.quat2, as_tensor(-np.rint(maker.shift2))), BOX, 2)
    cc = (second * moved).sum((1, 2)) / ((second * second).sum((1, 2)) * (moved * moved).sum((1, 2))).sqrt()
    assert cc.min() > 0.97
    dist = np.linalg.norm(maker.shift2, axis=1) / maker.radius
    assert ((dist[:6] >= 1.6) & (dist[:6] <= 2.0)).all()  # touching: about one diameter
    assert (np.abs(np.linalg.norm(maker.shift2[6:], axis=1) - BOX / 2) <= 0.4 * maker.radius).all()  # box edge


def test_realistic_preset_sets_the_issues_set_d_and_a_given_option_wins(tmp_path):
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "r"), "--n", "150", "--box", str(BOX),
                "--realistic", "--junk-fraction", "0.1", "--seed", "8"]) == 0
    _, truth, meta = stack_and_truth(tmp_path / "r")
    real = meta["realism"]
    assert real["noise_bfactor_A2"] == realism.REALISTIC["noise_bfactor"] and real["normalise"]
    assert real["preferred_views"]["fraction"] == realism.REALISTIC["preferred_views"]
    assert real["junk_kinds"] == realism.REALISTIC["junk_kinds"].split(",")
    assert (truth["rlnCryoforumJunk"] > 0).sum() == 15  # the given --junk-fraction, not the preset's 0.2
    assert truth["rlnCtfBfactor"].between(50, 200).all() and truth["rlnMicrographName"].nunique() == 2
    assert truth["rlnDefocusU"].between(8000, 28000).all() and "rlnCryoforumViewDensity" in truth
    help_text = next(p["help"] for p in manifest.params("simulate") if p["name"] == "realistic")
    for name, value in realism.REALISTIC.items():  # the help lists the preset as it is
        flag = "--" + name.replace("_", "-")
        assert (flag if value is True else f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}") \
            in help_text, flag


@pytest.mark.parametrize("args, message", [(["--junk-kinds", "ice,dust"], "unknown junk kind"),
                                           (["--preferred-views", "0.5", "--orientations", "grid"], "grid"),
                                           (["--bfactor-min", "90", "--bfactor-max", "50"], "bfactor")])
def test_bad_realism_options_get_one_clear_error(tmp_path, capsys, args, message):
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "e"), "--n", "10", "--box", str(BOX)] + args) != 0
    assert message in capsys.readouterr().err
