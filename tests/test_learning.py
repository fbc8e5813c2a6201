"""Learning, measured on held-out particles (never trained on): an easy set (clean, 32 px) must end far below
chance (uniform random rotations: median 2.3 rad). Micro configuration; real sizes are in benchmarks/."""

import json

import numpy as np

from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP


def test_training_learns_on_held_out_particles(tmp_path):
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "sim"), "--n", "2000", "--box", "32",
                "--snr", "0", "--no-ctf", "--seed", "4"]) == 0
    assert cli(["train", "--particles", str(tmp_path / "sim" / "particles.star"), "--out", str(tmp_path / "m"),
                "--box", "32", "--width", "0.25", "--epochs", "30", "--batch", "32", "--lr", "0.003",
                "--dropout", "0", "--l2", "0", "--qcqp-param", "symmetric", "--augment-psi", "--training", "single",
                "--val-fraction", "0.1", "--test-fraction", "0.2", "--seed", "42"]) == 0
    assert cli(["predict", "--model", str(tmp_path / "m"), "--particles", str(tmp_path / "sim" / "particles.star"),
                "--out", str(tmp_path / "p")]) == 0
    assert cli(["evaluate", "--predicted", str(tmp_path / "p" / "predicted.star"), "--truth",
                str(tmp_path / "sim" / "truth.star"), "--model", str(tmp_path / "m"), "--split", "test",
                "--out", str(tmp_path / "test.json")]) == 0
    test = json.loads((tmp_path / "test.json").read_text())
    assert test["n"] == 400  # 20 % held out, never seen in training
    train_rows = set(json.loads((tmp_path / "m" / "split.json").read_text())["train"]["rows"])
    assert len(train_rows) == 1400
    assert test["median_rad"] < 1.2, test  # chance: 2.3 rad
    assert test["median_rad"] < 0.55 * test["chance_median_rad"]
