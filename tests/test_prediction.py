"""Prediction is deterministic (same model and particles give the same poses, bit for bit, on one device) and
works for every input the model was trained with (phase-flipped channel)."""

import numpy as np

from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.formats.files import read_particles


def test_prediction_is_bit_for_bit_deterministic_and_phase_flip_models_predict(tmp_path):
    d = tmp_path
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(d / "sim"), "--n", "96", "--box", "32", "--snr", "1",
                "--seed", "9"]) == 0
    assert cli(["train", "--particles", str(d / "sim" / "particles.star"), "--out", str(d / "m"), "--box", "32",
                "--width", "0.125", "--epochs", "1", "--batch", "32", "--phase-flip", "--preset", "paper"]) == 0
    ps = read_particles(d / "sim" / "particles.star")
    first, pred1 = steps.predict(ps, d / "m", device="cpu", batch=40, tta=2)
    second, pred2 = steps.predict(read_particles(d / "sim" / "particles.star"), d / "m", device="cpu", batch=40, tta=2)
    assert np.array_equal(first.quat, second.quat) and np.array_equal(pred1.evals, pred2.evals)
    assert np.isfinite(first.quat).all() and np.allclose(np.linalg.norm(first.quat, axis=1), 1)
