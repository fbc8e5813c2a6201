"""The model knows its pixel size: particles re-extracted at another pixel size, and a STAR with two optics
groups of different pixel sizes, are brought to the model's sampling (Fourier crop / pad per group) and get the
poses the model gives the same particles at its own sampling (noise-free images, so any difference is the
rescaling); particles coarser than the model's sampling are one clear error."""

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.infer.metrics import geodesic_errors
from cryoforum_plugin.formats.loader import ImageSource
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.nn.preprocess import to_model_grid


def _simulate(d, box, seed, n, angles=None):
    args = ["simulate", str(DEFAULT_MAP), "--out", str(d), "--n", str(n), "--box", str(box), "--snr", "0",
            "--seed", str(seed), "--no-ctf"]
    assert cli(args + (["--angles", str(angles)] if angles else [])) == 0
    return read_particles(d / "particles.star")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixel")
    _simulate(d / "a", 32, 1, 300)
    assert cli(["train", "--particles", str(d / "a" / "particles.star"), "--out", str(d / "m"), "--box", "32",
                "--width", "0.25", "--epochs", "2", "--batch", "32", "--lr", "0.003", "--preset", "paper",
                "--test-fraction", "0"]) == 0
    return d


def _predicted(ps, model_dir):
    pred, _ = steps.predict(ps, model_dir, device="cpu")
    return pred.quat


def _reboxed(d, name, images, pixel_size, star):
    """A STAR of ``images`` (a new stack) with the poses of ``star`` at ``pixel_size``."""
    with mrcfile.new(d / f"{name}.mrcs", overwrite=True) as m:
        m.set_data(np.ascontiguousarray(images, dtype=np.float32))
    t = starfile.read(star, always_dict=True)
    optics = t["optics"].assign(rlnImageSize=images.shape[-1], rlnImagePixelSize=pixel_size)
    parts = t["particles"].iloc[: len(images)].assign(
        rlnImageName=[f"{i + 1:06d}@{name}.mrcs" for i in range(len(images))])
    starfile.write({"optics": optics, "particles": parts}, d / f"{name}.star")
    return read_particles(d / f"{name}.star")


def test_particles_at_a_finer_pixel_size_are_rescaled_to_the_model(model):
    d = model
    same = read_particles(d / "a" / "particles.star")
    fine = _simulate(d / "b", 48, 2, 300, angles=d / "a" / "truth.star")  # same poses, finer pixels ...
    big = np.pad(mrcfile.read(d / "b" / "particles.mrcs"), ((0, 0), (8, 8), (8, 8)))  # ... re-extracted at 64 px
    wide = _reboxed(d / "b", "wide", big, float(fine.pixel_size[0]), d / "b" / "particles.star")
    reference = _predicted(same, d / "m")
    agree = np.degrees(np.median(geodesic_errors(_predicted(wide, d / "m"), reference)))
    assert agree < 3, agree
    # the network sees the same images: inputs at the model's sampling against what happened before (the 64 px
    # images Fourier-cropped to the model's box: a field of view 4/3 too wide)
    pre, _, _ = ModelDir(d / "m").load()
    own = pre(ImageSource(same, cache_bytes=0).batch(np.arange(300)))[:, 0].flatten(1)
    raw = ImageSource(wide, cache_bytes=0).batch(np.arange(300))
    now = pre(to_model_grid(raw, wide.pixel_size, float(same.pixel_size[0]), 32))[:, 0].flatten(1)
    old = pre(raw)[:, 0].flatten(1)

    def corr(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).median())

    assert corr(now, own) > 0.95 and corr(old, own) < corr(now, own) - 0.2, (corr(now, own), corr(old, own))


def _two_optics_groups(d, n):
    """``d/mixed.star``: the first ``n`` particles of ``d/a`` (32 px, optics group 1) then the same poses simulated
    at 36 px over the same field of view and re-boxed to 32 px (finer pixels, optics group 2)."""
    _simulate(d / "c", 36, 3, n, angles=d / "a" / "truth.star")  # 36 px over the field of view ...
    stack = mrcfile.read(d / "c" / "particles.mrcs")[:, 2:34, 2:34]  # ... re-boxed to 32 px (finer pixels)
    with mrcfile.new(d / "c" / "boxed.mrcs", overwrite=True) as m:
        m.set_data(np.ascontiguousarray(stack, dtype=np.float32))
    a = starfile.read(d / "a" / "particles.star", always_dict=True)
    c = starfile.read(d / "c" / "particles.star", always_dict=True)
    optics = pd.concat([a["optics"], c["optics"].assign(rlnOpticsGroup=2, rlnOpticsGroupName="opticsGroup2",
                                                        rlnImageSize=32)])
    pa = a["particles"].iloc[:n].assign(rlnImageName=[f"{i + 1:06d}@a/particles.mrcs" for i in range(n)])
    pc = c["particles"].iloc[:n].assign(rlnOpticsGroup=2,
                                        rlnImageName=[f"{i + 1:06d}@c/boxed.mrcs" for i in range(n)])
    starfile.write({"optics": optics, "particles": pd.concat([pa, pc])}, d / "mixed.star")
    return d / "mixed.star"


def test_two_optics_groups_of_different_pixel_sizes_in_one_star(model):
    d = model
    mixed = read_particles(_two_optics_groups(d, 150))
    assert len(set(np.round(mixed.pixel_size, 3))) == 2
    quat = _predicted(mixed, d / "m")  # both groups hold the same 150 poses
    reference = _predicted(read_particles(d / "a" / "particles.star").subset(np.arange(150)), d / "m")
    assert np.allclose(geodesic_errors(quat[:150], reference), 0, atol=1e-3)
    assert np.degrees(np.median(geodesic_errors(quat[150:], reference))) < 5


def test_particles_coarser_than_the_model_are_one_clear_error(model, capsys):
    d = model
    _simulate(d / "coarse", 24, 4, 10)
    code = cli(["predict", "--model", str(d / "m"), "--particles", str(d / "coarse" / "particles.star"),
                "--out", str(d / "p")])
    err = capsys.readouterr().err
    assert code == 2 and "Nyquist" in err and "Traceback" not in err
    with pytest.raises(CryoforumError):
        steps.predict(read_particles(d / "coarse" / "particles.star"), d / "m", device="cpu")


def test_a_model_whose_box_pads_its_training_images_predicts_them(tmp_path):
    """--box larger than the images (a preset's 64 on 32-px particles) Fourier-pads them: the model's information
    limit is its training particles' Nyquist, so particles at that pixel size (its own, or new ones) are predicted,
    not refused as coarser than the padded grid (the RELION train_predict job failed this way)."""
    ps = _simulate(tmp_path / "a", 32, 1, 60)
    assert cli(["train", "--particles", str(tmp_path / "a" / "particles.star"), "--out", str(tmp_path / "m"),
                "--box", "48", "--width", "0.125", "--epochs", "1", "--batch", "16", "--preset", "paper",
                "--test-fraction", "0"]) == 0
    quat = _predicted(ps, tmp_path / "m")
    assert len(quat) == 60 and np.isfinite(quat).all()
    coarser = _simulate(tmp_path / "c", 24, 4, 5)  # coarser than the training particles: still one clear error
    with pytest.raises(CryoforumError, match="Nyquist"):
        steps.predict(coarser, tmp_path / "m", device="cpu")


def test_every_single_grid_step_refuses_two_pixel_sizes_with_one_clear_error(tmp_path, capsys):
    """Reconstruction, the noise estimate, refinement and pre-training from a map work on one grid: a STAR with two
    optics groups of different pixel sizes is one CryoforumError naming the file, the first row of the second
    group and the fix (the CLI prints it as one line, exit 2), never a map or poses computed at the wrong
    sampling; prediction resamples each group instead (test above)."""
    from cryoforum_plugin.formats.mrc import write_mrc
    from cryoforum_plugin.physics.noise import estimate_noise_spectrum
    from cryoforum_plugin.physics.resample import resized_map

    _simulate(tmp_path / "a", 32, 1, 12)
    star = _two_optics_groups(tmp_path, 12)
    ps = read_particles(star)
    vol, apix = resized_map(DEFAULT_MAP, 32)
    write_mrc(tmp_path / "ref.mrc", vol.numpy(), apix)

    def clear(exc):
        text = str(exc.value)
        assert exc.value.path == star and exc.value.row == 12, text
        assert "row 13" in text and "optics group 2" in text and "Fix:" in text, text

    for step in (lambda: steps.reconstruct(ps, tmp_path / "x.mrc", device="cpu"),
                 lambda: estimate_noise_spectrum(ps, vol.numpy(), map_pixel_size=apix),
                 lambda: steps.refine(ps, steps.Reference.from_files(reference=tmp_path / "ref.mrc"), device="cpu")):
        with pytest.raises(CryoforumError) as exc:
            step()
        clear(exc)
    commands = {"reconstruction": ["reconstruct", str(star), "--out", str(tmp_path / "x.mrc")],
                "refinement": ["refine", "--particles", str(star), "--reference", str(tmp_path / "ref.mrc"),
                               "--out", str(tmp_path / "r")],
                "pre-training from a map": ["train", "--particles", str(star), "--out", str(tmp_path / "m"),
                                            "--preset", "paper", "--pretrain-steps", "5", "--epochs", "0",
                                            "--box", "32", "--width", "0.125"]}
    for step, args in commands.items():
        capsys.readouterr()
        assert cli(args) == 2, step
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert str(star) in err and "row 13" in err and step in err and "one pixel size" in err, err
    assert not (tmp_path / "x.mrc").exists() and not (tmp_path / "r" / "refined.star").exists()
