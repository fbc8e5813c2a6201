"""Physics checked against real RELION 3.1: projection, CTF, reconstruction, and our STAR files in RELION."""

import shutil

import mrcfile
import numpy as np
import pytest
import torch

from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.physics.ctf import ctf_images
from cryoforum_plugin.physics.fsc import fsc_curve, resolution
from cryoforum_plugin.formats.mrc import read_map
from cryoforum_plugin.formats.star import read_star
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.physics.reconstruct import reconstruct

from conftest import run_relion

pytestmark = pytest.mark.relion


def _corr(a, b):
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("with_ctf", [False, True])
def test_projection_matches_relion_project(relion_set, with_ctf):
    """Every one of 400 random poses with shifts: correlation >= 0.99 with relion_project's image."""
    name = "parts_ctf" if with_ctf else "parts_clean"
    ps = read_star(relion_set["dir"] / f"{name}.star")
    ref = mrcfile.read(relion_set["dir"] / f"{name}.mrcs")
    apix, box = relion_set["pixel_size"], relion_set["box"]
    ctf = ctf_images(ps.ctf, np.arange(len(ps)), box, apix) if with_ctf else None
    ours = Projector(relion_set["map"]).project(ps.quat, torch.tensor(ps.shift_A / apix), ctf).numpy()
    cc = _corr(ours, ref)
    assert cc.min() >= 0.99, f"min correlation {cc.min():.4f}"
    # the transposed pose (a classic convention bug) must not pass
    wrong = Projector(relion_set["map"]).project(ps.quat * np.array([1, -1, -1, -1]),
                                                 torch.tensor(ps.shift_A / apix), ctf).numpy()
    assert np.median(_corr(wrong, ref)) < 0.7


def test_reconstruction_resolution_within_10_percent_of_relion(relion_set):
    d, apix, box = relion_set["dir"], relion_set["pixel_size"], relion_set["box"]
    ps = read_star(d / "parts_noisy.star")
    ours = reconstruct(ps, progress=False)["full"]
    run_relion(["relion_reconstruct", "--i", "parts_noisy.star", "--o", "relion_noisy.mrc", "--ctf"], cwd=d)
    theirs, _ = read_map(d / "relion_noisy.mrc")
    truth = relion_set["map"]
    for threshold in (0.143, 0.5):  # the issue asks for 0.143; 0.5 is the stricter check against a true map
        r_ours = resolution(fsc_curve(ours, truth), box, apix, threshold)
        r_theirs = resolution(fsc_curve(theirs, truth), box, apix, threshold)
        assert r_ours <= 1.10 * r_theirs, (threshold, r_ours, r_theirs)
    # and the two maps agree with each other
    assert resolution(fsc_curve(ours, theirs), box, apix, 0.5) <= 1.10 * r_theirs


def test_relion_reconstruct_accepts_simulated_star_and_matches_ours(small_map, relion, tmp_path):
    map_path, vol, apix = small_map
    out = tmp_path / "sim"
    assert cli(["simulate", str(map_path), "--out", str(out), "--n", "300", "--box", "64", "--snr", "1",
                "--max-shift", str(2 * apix), "--seed", "3"]) == 0
    run_relion(["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf"], cwd=out)
    assert cli(["reconstruct", str(out / "particles.star"), "--out", str(out / "ours.mrc")]) == 0
    theirs, _ = read_map(out / "relion.mrc")
    ours, _ = read_map(out / "ours.mrc")
    truth = vol
    r_theirs = resolution(fsc_curve(theirs, truth), 64, apix, 0.5)
    r_ours = resolution(fsc_curve(ours, truth), 64, apix, 0.5)
    assert r_theirs < 6 * apix  # RELION sees the real structure in our particles (Nyquist is 2 px)
    assert r_ours <= 1.10 * r_theirs
    assert fsc_curve(ours, theirs)[1: 64 // 4].min() > 0.9


def test_star_converted_from_cs_gives_relion_the_same_map(relion_set, tmp_path):
    """RELION STAR -> .cs -> STAR via `cryoforum convert`; relion_reconstruct on both gives the same map."""
    d = relion_set["dir"]
    work = tmp_path / "w"
    shutil.copytree(d, work)
    assert cli(["convert", str(work / "parts_noisy.star"), str(work / "parts.cs")]) == 0
    assert cli(["convert", str(work / "parts.cs"), str(work / "converted.star")]) == 0
    run_relion(["relion_reconstruct", "--i", "parts_noisy.star", "--o", "orig.mrc", "--ctf"], cwd=work)
    run_relion(["relion_reconstruct", "--i", "converted.star", "--o", "conv.mrc", "--ctf"], cwd=work)
    a, _ = read_map(work / "orig.mrc")
    b, _ = read_map(work / "conv.mrc")
    # relion_reconstruct itself moves by ~0.2 % when angles change by 1e-5 degrees (measured: correlation
    # 0.9985), and .cs stores poses as float32; so: identical up to that floor, shell by shell.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995
    assert fsc_curve(a, b)[1:].min() > 0.98
    box, apix = relion_set["box"], relion_set["pixel_size"]
    truth = relion_set["map"]
    ra, rb = (resolution(fsc_curve(m, truth), box, apix, 0.5) for m in (a, b))
    assert abs(ra - rb) <= 0.02 * ra


@pytest.mark.parametrize("sym", ["D2"])
def test_symmetrised_reconstruction_agrees_with_relion(sym, relion, tmp_path):
    from cryoforum_plugin.data import BETAGAL_MAP
    from cryoforum_plugin.physics.resample import resized_map

    vol, apix = resized_map(BETAGAL_MAP, 32)
    from cryoforum_plugin.formats.mrc import write_mrc

    write_mrc(tmp_path / "map.mrc", vol.numpy(), apix)
    assert cli(["simulate", str(tmp_path / "map.mrc"), "--out", str(tmp_path / "s"), "--n", "150", "--box", "32",
                "--snr", "0.5", "--sym", sym, "--restrict-to-asu", "--seed", "5"]) == 0
    run_relion(["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf", "--sym", sym],
               cwd=tmp_path / "s")
    assert cli(["reconstruct", str(tmp_path / "s" / "particles.star"), "--out", str(tmp_path / "ours.mrc"),
                "--sym", sym]) == 0
    theirs, _ = read_map(tmp_path / "s" / "relion.mrc")
    ours, _ = read_map(tmp_path / "ours.mrc")
    assert fsc_curve(ours, theirs)[1: 32 // 4].min() > 0.9  # shell 0 is the mean alone
