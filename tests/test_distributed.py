"""torch.distributed on CPU (gloo), two processes started by torchrun: DDP training runs and writes one model;
sharded prediction merges into one ordered output equal to the single-process one."""

import os
import subprocess
import sys

import numpy as np
import starfile

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP


def torchrun(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "cryoforum_plugin.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_training_and_sharded_prediction(tmp_path):
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(tmp_path / "sim"), "--n", "203", "--box", "32", "--snr", "1",
                "--seed", "8"]) == 0
    parts = str(tmp_path / "sim" / "particles.star")
    torchrun("train", "--particles", parts, "--out", str(tmp_path / "m"), "--box", "32", "--width", "0.125",
             "--epochs", "2", "--batch", "16", "--preset", "paper", cwd=tmp_path)
    log = (tmp_path / "m" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # one log, written by rank 0 only
    torchrun("predict", "--model", str(tmp_path / "m"), "--particles", parts, "--out", str(tmp_path / "p2"),
             "--batch", "25", cwd=tmp_path)
    assert cli(["predict", "--model", str(tmp_path / "m"), "--particles", parts, "--out", str(tmp_path / "p1"),
                "--batch", "25"]) == 0
    one = starfile.read(tmp_path / "p1" / "predicted.star")["particles"]
    two = starfile.read(tmp_path / "p2" / "predicted.star")["particles"]
    assert len(two) == 203 and (one["rlnImageName"] == two["rlnImageName"]).all()
    q1 = rotations.relion_euler_to_quat(one["rlnAngleRot"], one["rlnAngleTilt"], one["rlnAnglePsi"])
    q2 = rotations.relion_euler_to_quat(two["rlnAngleRot"], two["rlnAngleTilt"], two["rlnAnglePsi"])
    assert rotations.geodesic(q1, q2).max() < 1e-4  # the same rotations, in the same order
    assert np.allclose(one["rlnCryoforumTraceDispersion"], two["rlnCryoforumTraceDispersion"], rtol=1e-4, atol=1e-4)
