"""The simulator's options: given poses and CTFs, junk labels, SNR definition, chunked streaming."""

import json

import mrcfile
import numpy as np
import starfile

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import BETAGAL_MAP, DEFAULT_MAP
from cryoforum_plugin.formats.cs import read_cs
from cryoforum_plugin.formats.star import read_star


def test_outputs_agree_and_snr_and_junk_are_as_asked(tmp_path):
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "s"), "--n", "200", "--box", "32", "--snr",
                "0.5", "--max-shift", "6", "--junk-fraction", "0.3", "--seed", "1"]) == 0
    star, cs = read_star(tmp_path / "s" / "particles.star"), read_cs(tmp_path / "s" / "particles.cs")
    assert rotations.geodesic(star.quat, cs.quat).max() < 1e-5 and np.allclose(star.shift_A, cs.shift_A, atol=1e-4)
    assert np.abs(star.shift_A).max() <= 6.0 and (star.uid == cs.uid).all()
    truth = starfile.read(tmp_path / "s" / "truth.star")["particles"]
    junk = truth["rlnCryoforumJunk"].to_numpy()
    assert (junk > 0).sum() == 60 and set(np.unique(junk)) == {0, 1, 2, 3}
    meta = json.loads((tmp_path / "s" / "simulation.json").read_text())
    stack = mrcfile.read(tmp_path / "s" / "particles.mrcs")
    noise_only = stack[junk == 1]  # pure-noise junk: its variance is the noise variance
    assert abs(noise_only.var() / meta["noise_std"] ** 2 - 1) < 0.05
    assert abs(meta["signal_var"] / meta["noise_std"] ** 2 - 0.5) < 1e-6


def test_given_angles_and_ctf_are_used(tmp_path):
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "a"), "--n", "50", "--box", "32", "--snr", "1",
                "--max-shift", "5", "--seed", "2"]) == 0
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "b"), "--box", "32", "--snr", "0",
                "--angles", str(tmp_path / "a" / "particles.star"), "--seed", "3"]) == 0
    a, b = read_star(tmp_path / "a" / "particles.star"), read_star(tmp_path / "b" / "particles.star")
    assert len(b) == 50 and rotations.geodesic(a.quat, b.quat).max() < 1e-5
    assert np.allclose(a.shift_A, b.shift_A, atol=1e-5) and np.allclose(a.ctf["defocus_u"], b.ctf["defocus_u"])
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "c"), "--n", "40", "--box", "32",
                "--ctf-from", str(tmp_path / "a" / "particles.cs"), "--seed", "4"]) == 0
    c = read_star(tmp_path / "c" / "particles.star")
    assert set(np.round(c.ctf["defocus_u"], 2)) <= set(np.round(a.ctf["defocus_u"], 2))


def test_chunked_streaming_gives_the_same_particles(tmp_path):
    for name, chunk in (("one", "1000"), ("many", "7")):
        assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / name), "--n", "30", "--box", "32",
                    "--snr", "0.3", "--chunk", chunk, "--seed", "5"]) == 0
    assert np.allclose(mrcfile.read(tmp_path / "one" / "particles.mrcs"),
                       mrcfile.read(tmp_path / "many" / "particles.mrcs"), atol=1e-5)


def test_asymmetric_unit_restriction(tmp_path):
    assert cli(["simulate", str(BETAGAL_MAP), "--out", str(tmp_path / "d"), "--n", "100", "--box", "32",
                "--sym", "D2", "--restrict-to-asu", "--orientations", "grid", "--no-ctf", "--seed", "6"]) == 0
    ps = read_star(tmp_path / "d" / "particles.star")
    assert symmetry.in_asu(ps.quat, "D2", tol=1e-4).all()
