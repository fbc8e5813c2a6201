"""The contrast sign of cryoSPARC particles (``blob/sign``) is honoured: -1 (dark particles, the micrograph's
contrast, as cryoSPARC's Extract job stores them) is flipped to the engine's convention (+1: light particles, RELION's
convention) on every image read; the sign goes back out as the input had it (.cs) or in rlnCryoforumImageSign
(STAR), and a set from STAR is written with +1. A stack of the other contrast with the matching sign gives the
engine the same images, maps, noise model and refinement scores; read without its sign (as before) its refinement
scores fall to a third (the score clamps negative correlation to zero)."""

import mrcfile
import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.formats.loader import ImageSource
from cryoforum_plugin.physics.noise import estimate_noise_spectrum
from cryoforum_plugin.formats.columns import IMAGE_SIGN_STAR
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.physics.reconstruct import reconstruct
from cryoforum_plugin.refine.driver import refine
from cryoforum_plugin.physics.resample import resized_map

from conftest import DATA

N, BOX = 24, 32


@pytest.fixture(scope="module")
def two_contrasts(tmp_path_factory):
    """(light.cs, dark.cs): the same simulated particles (RELION contrast, written by `cryoforum simulate` from its
    STAR-origin set) and their negated stack with blob/sign = -1, in the field layout of a real cryoSPARC
    refinement output (tests/data/schema_0rows.cs: 106 fields) plus the blob and ctf slots."""
    d = tmp_path_factory.mktemp("contrast")
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(d), "--n", str(N), "--box", str(BOX), "--snr", "2",
                "--seed", "5"]) == 0
    light = Dataset.load(str(d / "particles.cs"))
    with mrcfile.new(d / "dark.mrcs") as m:
        m.set_data(-mrcfile.read(d / "particles.mrcs"))
    real = Dataset.load(str(DATA / "schema_0rows.cs"))
    extra = [f for f in real.descr() if f[0] not in light.fields()]
    dark = light.copy().add_fields(extra)
    dark["blob/path"] = np.array(["dark.mrcs"] * N, dtype=object)
    dark["blob/sign"] = -1.0
    dark.save(str(d / "dark.cs"))
    return d / "particles.cs", d / "dark.cs"


def test_blob_sign_is_read_and_written_back_in_both_formats(two_contrasts, tmp_path):
    light_path, dark_path = two_contrasts
    assert (Dataset.load(str(light_path))["blob/sign"] == 1.0).all()  # written from STAR: RELION's contrast
    light, dark = read_particles(light_path), read_particles(dark_path)
    assert (light.image_sign == 1).all() and (dark.image_sign == -1).all()
    assert "blob/sign" not in dark.numeric and (dark.column("blob/sign") == -1).all()
    assert (dark.subset(np.arange(3, 9)).image_sign == -1).all()
    assert cli(["convert", str(dark_path), str(tmp_path / "dark.star")]) == 0
    assert (starfile.read(tmp_path / "dark.star")["particles"][IMAGE_SIGN_STAR] == -1).all()
    assert (read_particles(tmp_path / "dark.star").image_sign == -1).all()
    for src in (dark_path, tmp_path / "dark.star"):  # .cs -> .cs keeps the input's sign, STAR -> .cs restores it
        out = tmp_path / f"back_{src.suffix[1:]}.cs"
        assert cli(["convert", str(src), str(out), "--project-dir", str(dark_path.parent)]) == 0
        assert (Dataset.load(str(out))["blob/sign"] == -1.0).all(), src
    (tmp_path / "relion.star").write_text((tmp_path / "dark.star").read_text().replace(IMAGE_SIGN_STAR, "rlnX"))
    assert cli(["convert", str(tmp_path / "relion.star"), str(tmp_path / "relion.cs"),
                "--project-dir", str(dark_path.parent)]) == 0
    assert (Dataset.load(str(tmp_path / "relion.cs"))["blob/sign"] == 1.0).all()  # a plain RELION STAR: +1


def test_a_flipped_stack_with_its_sign_gives_the_engine_the_same_images_and_results(two_contrasts):
    light, dark = (read_particles(p) for p in two_contrasts)
    rows = np.arange(N)
    same = ImageSource(light).batch(rows)
    for source, workers in ((ImageSource(dark), 0), (ImageSource(dark, cache_bytes=0), 0),
                            (ImageSource(dark, cache_bytes=0), 1)):  # cached, streamed, loader processes
        got = next(source.batches(rows, N, workers=workers))[1]
        assert np.array_equal(got.numpy(), same.numpy())
    maps = [reconstruct(ps, device="cpu", progress=False)["full"] for ps in (light, dark)]
    assert np.allclose(maps[0], maps[1], atol=1e-6 * np.abs(maps[0]).max())
    vol, apix = resized_map(DEFAULT_MAP, BOX)
    noise = [estimate_noise_spectrum(ps, vol.numpy(), map_pixel_size=apix) for ps in (light, dark)]
    assert np.allclose(noise[0].spectrum, noise[1].spectrum) and np.isclose(noise[0].snr, noise[1].snr)
    ref = steps.Reference(vol.numpy(), apix, "test")
    scores = [refine(ps, ref.maps, reference_pixel_size=apix, global_search="none", device="cpu",
                     progress=False).score for ps in (light, dark)]
    assert np.median(scores[0]) > 0.1 and np.allclose(scores[0], scores[1], atol=1e-4), scores
    unsigned = light.subset(rows)  # the dark stack read as if blob/sign were +1 (what was done before)
    unsigned.image_path, unsigned.image_sign = dark.image_path, None
    blind = refine(unsigned, ref.maps, reference_pixel_size=apix, global_search="none", device="cpu",
                   progress=False).score
    assert np.median(blind) < 0.5 * np.median(scores[0]), (blind, scores[0])  # measured 0.26 against 0.78
