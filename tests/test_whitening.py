"""The training levers of issue 21: whitening of the network's input by the training particles' noise spectrum
(--whiten: estimated once, stored with the model, applied alike in training, pre-training and prediction) and
balanced sampling of viewing directions (--balance-views)."""

import json

import numpy as np
import pytest
import torch

from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.formats.mrc import StackReader
from cryoforum_plugin.formats.star import read_star
from cryoforum_plugin.infer.predict import predict
from cryoforum_plugin.nn.model import OrientationNet
from cryoforum_plugin.nn.preprocess import Preprocess, noise_colour
from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics.fourier import soft_circular_mask
from cryoforum_plugin.physics.noise import (
    coloured_noise, estimate_noise_spectrum, lorentzian_with_bump, radial_power, relative_spectrum, spectrum_colour,
    whiten,
)
from cryoforum_plugin.physics.resample import resample, resized_map
from cryoforum_plugin.sim.batches import MapParticleSimulator
from cryoforum_plugin.sim.dataset import simulate
from cryoforum_plugin.train.config import TrainConfig
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.train.trainer import Trainer
from cryoforum_plugin.train.views import view_balance_weights

BOX = 32


def flatness(power: np.ndarray) -> float:
    """Largest over smallest shell of a radial power spectrum, shells 1 ... Nyquist."""
    return float(power[1:].max() / power[1:].min())


@pytest.fixture(scope="module")
def coloured_set(tmp_path_factory):
    """300 particles of the default map, 32 px, SNR 0.1, noise of noise.lorentzian_with_bump()'s colour."""
    d = tmp_path_factory.mktemp("coloured")
    sim = simulate(DEFAULT_MAP, d / "sim", n=300, box=BOX, snr=0.1, max_shift=4.0, seed=11, progress=False,
                   noise_spectrum=lorentzian_with_bump())
    ps = read_star(d / "sim" / "particles.star")
    images = torch.from_numpy(ps.read_images(StackReader(), np.arange(len(ps))))
    true = relative_spectrum(lorentzian_with_bump(), BOX, sim.pixel_size)
    return {"dir": d, "ps": ps, "images": images, "true": true, "pixel_size": sim.pixel_size}


def test_a_known_coloured_spectrum_is_recovered_and_whitened_flat(coloured_set):
    true = coloured_set["true"]
    assert flatness(true) > 3  # the colour the set was made with: far from white
    pre = Preprocess(BOX, "none")
    record = pre.fit(coloured_set["images"], "auto")
    assert record["applied"] and pre.whitens and record["colour"] > 2  # auto: coloured noise is whitened
    stored = pre.noise_spectrum.double().numpy()
    rel = np.abs(stored / true - 1)
    assert np.median(rel[1:]) < 0.1 and rel[2:].max() < 0.3, rel  # recovered from the particles' background
    # fresh noise of the true colour, and the pre-training's synthetic noise (the spectrum estimated against the
    # map, as pretrain.py does), come out white through the stored filter
    g = torch.Generator().manual_seed(3)
    noise = coloured_noise(2000, BOX, true, g)
    assert flatness(radial_power(noise).numpy()) > 3
    assert flatness(radial_power(whiten(noise, pre.noise_spectrum)).numpy()) < 1.5
    vol, _ = resized_map(DEFAULT_MAP, BOX)
    model = estimate_noise_spectrum(coloured_set["ps"], vol)
    synthetic = MapParticleSimulator(vol, coloured_set["pixel_size"], noise=model, snr=1.0).noise.sample(2000, g)
    assert flatness(radial_power(whiten(synthetic, pre.noise_spectrum)).numpy()) < 1.5
    # a flat spectrum is the identity, and whitening keeps the per-pixel variance of noise of the stored colour
    assert torch.allclose(whiten(noise, torch.ones(BOX // 2 + 1)), noise, atol=1e-4)
    unit = coloured_noise(2000, BOX, pre.noise_spectrum, g)
    assert abs(float(whiten(unit, pre.noise_spectrum).var()) / float(unit.var()) - 1) < 0.05


def test_white_noise_is_left_alone_by_auto_and_off_is_bit_identical():
    white = torch.randn(400, BOX, BOX, generator=torch.Generator().manual_seed(1)) * 3.0 + 0.5
    off, auto = Preprocess(BOX, "lowpass"), Preprocess(BOX, "lowpass")
    assert off.fit(white) is None and not off.whitens
    record = auto.fit(white, "auto")
    assert not record["applied"] and not auto.whitens and record["colour"] < 2
    assert torch.equal(off(white[:50]), auto(white[:50]))
    forced = Preprocess(BOX, "lowpass")
    assert forced.fit(white, "on")["applied"] and forced.whitens  # on: always, even for white noise
    # today's formula, written out: Fourier crop, mask, standardise with the sample's statistics
    x = resample(white, BOX, 2) * soft_circular_mask(BOX, 0.85, 0.99)
    assert torch.equal(off(white[:50])[:, 0], (x[:50] - x.mean()) / x.std())


def test_stored_spectrum_travels_with_the_model_and_prediction_applies_it(coloured_set, tmp_path):
    ps, raw = coloured_set["ps"], coloured_set["images"]
    cfg = dict(box=BOX, width=0.125, epochs=1, batch=32, dropout=0.0)
    t = Trainer(ps, tmp_path / "m", TrainConfig(**cfg, whiten="on", balance_views=True), torch.device("cpu"),
                progress=False)
    t.train()
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["whitening"]["applied"] and meta["whitening"]["option"] == "on"
    assert meta["view_balance"]["occupied"] >= 1
    pre, _, _ = ModelDir(tmp_path / "m").load()
    assert pre.whitens and torch.equal(pre.noise_spectrum, t.pre.noise_spectrum)
    assert torch.equal(pre(raw[:40]), t.pre(raw[:40]))
    seen = []

    def capture(module, args):
        if isinstance(module, OrientationNet):
            seen.append(args[0].detach().clone())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(capture)
    try:
        predict(ps, tmp_path / "m", device="cpu", batch=len(ps), progress=False)
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], t.pre(raw))  # the network saw what training would give it
    # --whiten off: the Preprocess of today (no spectrum, same statistics formula)
    plain = Trainer(ps, tmp_path / "off", TrainConfig(**cfg), torch.device("cpu"), progress=False)
    assert not plain.pre.whitens and plain.whitening is None
    rows = plain.split["train"][:2000]
    x = resample(raw[rows], BOX, 2) * soft_circular_mask(BOX, 0.85, 0.99)
    assert torch.equal(plain.pre(raw)[:, 0], (resample(raw, BOX, 2) * soft_circular_mask(BOX, 0.85, 0.99)
                                              - x.mean()) / x.std())
    # a model saved before whitening existed (no noise_spectrum in its state) loads without whitening
    state = torch.load(tmp_path / "m" / "best.pt", weights_only=False)
    del state["preprocess"]["noise_spectrum"]
    old = Preprocess(BOX, "lowpass")
    old.load_state_dict(state["preprocess"])
    assert not old.whitens


def clustered_poses(seed: int, n: int = 2000, cluster: float = 0.8, spread_deg: float = 10.0) -> np.ndarray:
    """(n, 4) poses: ``cluster`` of them with viewing directions within ``spread_deg`` of one random direction
    (any in-plane angle), the rest uniform over SO(3); the cluster first."""
    rng = np.random.default_rng(seed)
    k = int(cluster * n)
    axis = rotations.random_quats(1, rng)
    tilt = np.radians(spread_deg) * np.sqrt(rng.uniform(0, 1, k))  # uniform over the cap
    turn = rotations.relion_euler_to_quat(rng.uniform(0, 360, k), np.degrees(tilt), rng.uniform(0, 360, k))
    near = rotations.quat_mul(turn, np.repeat(axis, k, axis=0))
    return np.concatenate([near, rotations.random_quats(n - k, rng)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_views_draw_the_rare_views_several_times_more_often(seed):
    quat = clustered_poses(seed)
    rare = np.arange(len(quat)) >= int(0.8 * len(quat))
    assert (rotations.viewing_direction(quat[~rare]) @ rotations.viewing_direction(quat[:1])[0] > 0.93).all()
    weights, record = view_balance_weights(quat)
    assert abs(weights.sum() - 1) < 1e-9 and (weights > 0).all()
    assert record["largest_bin_fraction"] > 0.2  # the cluster fills a few bins
    # uniform sampling draws the rare views 20 % of the time; balanced sampling at least 3x that
    draws = torch.multinomial(torch.as_tensor(weights), 20000, replacement=True,
                              generator=torch.Generator().manual_seed(seed)).numpy()
    share = rare[draws].mean()
    assert share > 3 * rare.mean(), share
    # the same poses given as other symmetry mates (C2) are the same views: the same weights
    c2 = rotations.quat_mul(quat, np.array([[0.0, 0.0, 0.0, 1.0]]))  # mates q ⊗ g, g: 180° about z
    mixed = np.where((np.arange(len(quat)) % 2 == 0)[:, None], quat, c2)
    assert np.allclose(view_balance_weights(mixed, "C2")[0], view_balance_weights(quat, "C2")[0])


# ---------------------------------------------------------------------------------------------- predict --rewhiten


def blue(s):
    """A noise colour unlike the training set's (lorentzian_with_bump falls with frequency): rising power."""
    s = np.asarray(s, dtype=np.float64)
    return 0.15 + (s / s.max()) ** 2


def red(s):
    """Another colour, falling steeply to a floor."""
    s = np.asarray(s, dtype=np.float64)
    return 0.05 + np.exp(-((s / (0.3 * s.max())) ** 2))


@pytest.fixture(scope="module")
def rewhiten_sets(coloured_set, tmp_path_factory):
    """A tiny --whiten on model trained on ``coloured_set`` (noise of lorentzian_with_bump's colour), and
    ``two.star``: 150 new particles with ``blue`` noise (optics group 1) then 150 with ``red`` noise (group 2)."""
    import pandas as pd
    import starfile

    d = tmp_path_factory.mktemp("rewhiten")
    cfg = dict(box=BOX, width=0.125, epochs=1, batch=32, dropout=0.0, whiten="on")
    Trainer(coloured_set["ps"], d / "m", TrainConfig(**cfg), torch.device("cpu"), progress=False).train()
    tables = []
    for group, (name, colour) in enumerate((("blue", blue), ("red", red)), start=1):
        simulate(DEFAULT_MAP, d / name, n=150, box=BOX, snr=0.1, max_shift=2.0, seed=20 + group, progress=False,
                 noise_spectrum=colour)
        t = starfile.read(d / name / "particles.star", always_dict=True)
        tables.append({"optics": t["optics"].assign(rlnOpticsGroup=group, rlnOpticsGroupName=f"opticsGroup{group}"),
                       "particles": t["particles"].assign(rlnOpticsGroup=group, rlnImageName=[
                           f"{i + 1:06d}@{name}/particles.mrcs" for i in range(len(t["particles"]))])})
    starfile.write({k: pd.concat([t[k] for t in tables]) for k in ("optics", "particles")}, d / "two.star")
    ps = read_star(d / "two.star")
    true = [relative_spectrum(c, BOX, float(ps.pixel_size[0])) for c in (blue, red)]
    return {"dir": d, "model": d / "m", "ps": ps, "true": true}


def preprocess_inputs(ps, model_dir, **kw):
    """Run prediction and capture what its preprocessing got: (the Prediction, the raw images (N, box, box) in
    row order, the whitening spectra passed (N, K) or None)."""
    seen = []

    def capture(module, args):
        if isinstance(module, Preprocess):
            seen.append(args)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(capture)
    try:
        pred = predict(ps, model_dir, device="cpu", batch=len(ps), progress=False, **kw)
    finally:
        hook.remove()
    assert len(seen) == 1
    images, _, spectrum = (list(seen[0]) + [None, None])[:3]
    return pred, images, spectrum


def background_colour(images, spectrum) -> float:
    """spectrum_colour of the background noise of raw (B, box, box) images whitened by ``spectrum`` (as the
    preprocessing whitens, before its mask), estimated as --whiten estimates."""
    return spectrum_colour(noise_colour([whiten(images, spectrum)], BOX))


def test_rewhiten_whitens_new_particles_of_another_colour_flat_per_optics_group(rewhiten_sets, capsys):
    ps, model = rewhiten_sets["ps"], rewhiten_sets["model"]
    pre, _, _ = ModelDir(model).load()
    stored = pre.noise_spectrum.clone()
    _, images, spectrum = preprocess_inputs(ps, model)
    assert spectrum is None  # default: the model's stored spectrum
    pred, again, spectra = preprocess_inputs(ps, model, rewhiten=True)
    assert torch.equal(images, again) and spectra.shape == (len(ps), BOX // 2 + 1)
    assert "--rewhiten: whitening each of 2 optics group(s)" in capsys.readouterr().out
    groups = [np.nonzero(ps.optics_group == g)[0] for g in (1, 2)]
    for rows, true in zip(groups, rewhiten_sets["true"]):
        own = spectra[rows]
        assert (own == own[0]).all()  # one spectrum per group ...
        rel = np.abs(own[0].double().numpy() / true - 1)
        assert np.median(rel[1:]) < 0.15, rel  # ... its own noise colour, recovered
        assert background_colour(images[rows], stored) > 2  # the model's spectrum leaves this group's noise coloured
        assert background_colour(images[rows], own[0]) < 1.3  # its own whitens it flat
    assert not torch.allclose(spectra[groups[0][0]], spectra[groups[1][0]], rtol=0.2)
    record = pred.rewhitening
    assert [g["optics_group"] for g in record["groups"]] == [1, 2] and record["sample"] == 2000
    assert all(g["estimated"] and g["particles"] == g["sampled"] == 150 for g in record["groups"])
    assert record["groups"][0]["max_ratio"] > 2 and record["stored_colour"] > 2
    assert torch.equal(ModelDir(model).load()[0].noise_spectrum, stored)  # the model is not changed


def test_rewhiten_reaches_predict_json_from_the_cli_and_every_front_end(rewhiten_sets, tmp_path):
    from cryoforum_plugin.cli import build_parser, main as cli
    from cryoforum_plugin.pipeline import options as pipeline_options
    from relion_external.cryoforum_relion import parse

    out = tmp_path / "p"
    assert cli(["predict", "--model", str(rewhiten_sets["model"]), "--particles",
                str(rewhiten_sets["dir"] / "two.star"), "--out", str(out), "--device", "cpu", "--rewhiten"]) == 0
    record = json.loads((out / "predict.json").read_text())
    assert "domain_check" in record and [g["optics_group"] for g in record["rewhitening"]["groups"]] == [1, 2]
    parser = build_parser()
    assert parser.parse_args(["predict", "--model", "m", "--particles", "p.star"]).rewhiten is False
    for argv in (["run", "--train", "p.star", "--rewhiten"],
                 ["watch", "--model", "m", "--in", "d", "--reference", "r.mrc", "--rewhiten"],
                 ["cryosparc", "--project", "P1", "--workspace", "W1", "--model", "m", "--predict", "J1:particles",
                  "--rewhiten"]):
        assert pipeline_options.options_from(parser.parse_args(argv)).rewhiten, argv[0]
    assert pipeline_options.options_from(parse(["--o", "External/job001/", "--rewhiten"])[0]).rewhiten
    assert pipeline_options.options().rewhiten is False


def test_rewhiten_with_a_model_that_does_not_whiten_is_a_note_and_changes_nothing(rewhiten_sets, tmp_path):
    import io

    from cryoforum_plugin.progress import Events

    ps = rewhiten_sets["ps"]
    cfg = dict(box=BOX, width=0.125, epochs=1, batch=32, dropout=0.0, max_particles=60)
    Trainer(ps, tmp_path / "m", TrainConfig(**cfg), torch.device("cpu"), progress=False).train()
    plain = predict(ps, tmp_path / "m", device="cpu", progress=False)
    stream = io.StringIO()
    again = predict(ps, tmp_path / "m", device="cpu", progress=False, rewhiten=True, events=Events(stream))
    assert stream.getvalue().count("--rewhiten has no effect") == 1 and "--whiten off" in stream.getvalue()
    assert np.array_equal(plain.quat, again.quat) and np.array_equal(plain.evals, again.evals)
    assert again.rewhitening is None
