"""The engine's building blocks: heads, uncertainty, augmentation conventions, pairs, checkpoints, outputs."""

import csv
import json

import numpy as np
import pytest
import starfile
import torch

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.physics import symmetry
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.nn.model import OrientationNet, gram_schmidt_6d, matrix_to_quat_torch, qcqp_matrix, qcqp_solve
from cryoforum_plugin.physics.fourier import fft2c, ifft2c, radius_2d
from cryoforum_plugin.physics.rotations import psi_rotation_quats
from cryoforum_plugin.nn.preprocess import LOWPASS_FRACTIONS, Preprocess, rotate_images
from cryoforum_plugin.physics.projector import Projector
from cryoforum_plugin.physics.resample import resized_map
from cryoforum_plugin.train.losses import curriculum, sample_pairs
from cryoforum_plugin.nn.uncertainty import dispersions, figure_of_merit


def test_qcqp_head_solves_the_qcqp_and_has_finite_gradients_when_degenerate():
    rows, cols = torch.triu_indices(4, 4)
    theta = torch.randn(16, 10, dtype=torch.float64)
    theta[:4] = 0
    theta[:4, rows == cols] = 1.0  # A = I: all eigenvalues equal (the eigh backward singularity)
    theta.requires_grad_(True)
    A = qcqp_matrix(theta)
    assert torch.allclose(A, A.transpose(1, 2)) and (torch.linalg.eigvalsh(A) > -1e-9).all()  # PSD
    q, ev = qcqp_solve(A)
    energy = torch.einsum("bi,bij,bj->b", q, A, q)
    assert torch.allclose(energy, ev[:, 0], atol=1e-3)  # q minimises qᵀAq over unit q
    assert torch.allclose(q.norm(dim=1), torch.ones(16, dtype=torch.float64))
    (q[:, 0] * q[:, 1]).sum().backward()
    assert torch.isfinite(theta.grad).all()


def test_6d_head_and_matrix_to_quat_are_consistent():
    x = torch.randn(50, 6, dtype=torch.float64)
    R = gram_schmidt_6d(x)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(50, 3, 3), atol=1e-10)
    assert torch.allclose(torch.linalg.det(R), torch.ones(50, dtype=torch.float64))
    q = matrix_to_quat_torch(R).numpy()
    assert np.allclose(rotations.quat_to_matrix(q), R.numpy(), atol=1e-8)


@pytest.mark.parametrize("head,pool,blur", [("qcqp", "gem", "lowpass"), ("quat", "max", "gaussian"),
                                            ("6d", "maxavg", "none")])
def test_network_shapes(head, pool, blur):
    pre = Preprocess(32, blur)
    net = OrientationNet(pre.channels, head, pool, width=0.125)
    out = net(pre(torch.randn(3, 48, 48)))
    assert out["quat"].shape == (3, 4) and torch.allclose(out["quat"].norm(dim=1), torch.ones(3), atol=1e-5)
    assert ("A" in out) == (head == "qcqp")
    assert pre(torch.randn(2, 48, 48)).shape == (2, 1 + (0 if blur == "none" else 3), 32, 32)


def test_lowpass_bank_removes_power_above_each_cutoff():
    """Each blurred channel keeps the image below its cut-off and nothing above (the raised-cosine edge ends at
    1.1 × cut-off), and equals the centred full-FFT definition of the filter."""
    pre = Preprocess(32, "lowpass")
    x = torch.randn(4, 32, 32)
    out = pre(x)
    base = out[:, 0]
    r = radius_2d(32) / 16  # fraction of Nyquist
    for c, f in enumerate(LOWPASS_FRACTIONS, start=1):
        spec = fft2c(out[:, c]).abs()
        assert spec[:, r > 1.1 * f].max() < 1e-4 * spec.max()
        inside = r < 0.9 * f
        assert torch.allclose(spec[:, inside], fft2c(base).abs()[:, inside], rtol=1e-4, atol=1e-3)
        assert torch.allclose(out[:, c], ifft2c(fft2c(base) * pre.bank[c - 1]).real, atol=1e-5)


def test_full_network_size_matches_paper():
    """Supplementary Table 1 network: about 20 M parameters (the paper reports 20.2 M)."""
    n = sum(p.numel() for p in OrientationNet(4).parameters())
    assert 18e6 < n < 21e6


def test_uncertainty_sign_and_definition():
    ev = np.array([[0.1, 0.2, 5.0, 9.0], [1.0, 1.0, 1.0, 1.0]])
    d = dispersions(ev)
    assert np.allclose(d["max"], [-0.1, 0.0]) and np.allclose(d["trace"], [0.3 - 14.2, 0.0])
    fom = figure_of_merit(d["trace"], 2.0)
    assert fom[0] > fom[1] and 0 <= fom.min() and fom.max() <= 1


def test_in_plane_rotation_is_a_change_of_psi():
    """Rotating the image by +a (our rotate_images) equals projecting at psi + a (the verified sign)."""
    vol, _ = resized_map(DEFAULT_MAP, 64)
    proj = Projector(vol)
    rng = np.random.default_rng(0)
    q = rotations.random_quats(30, rng)
    a = rng.uniform(-180, 180, 30)
    rotated = rotate_images(proj.project(q), torch.tensor(a, dtype=torch.float32)).numpy()
    right = proj.project(rotations.quat_mul(psi_rotation_quats(a), q)).numpy()
    wrong = proj.project(rotations.quat_mul(psi_rotation_quats(-a), q)).numpy()
    cc = lambda x, y: np.array([np.corrcoef(u.ravel(), v.ravel())[0, 1] for u, v in zip(x, y)])  # noqa: E731
    assert np.median(cc(rotated, right)) > 0.9 and np.median(cc(rotated, wrong)) < 0.6
    ang = rotations.quat_to_relion_euler(rotations.quat_mul(psi_rotation_quats(a), q))
    assert np.allclose(((ang[:, 2] - rotations.quat_to_relion_euler(q)[:, 2] - a + 180) % 360) - 180, 0, atol=1e-6)


def test_curriculum_and_pair_sampling():
    assert curriculum("siamese", 0.0) == (0.0, 1.0)
    b1, b2 = curriculum("siamese", 1.0)
    assert b1 == pytest.approx(0.5) and b2 == pytest.approx(0.0)
    assert curriculum("single", 0.3) == (0.5, 0.0) and curriculum("siamese_noreg", 0.5)[0] == 0.0
    rng = np.random.default_rng(0)
    q = torch.tensor(rotations.random_quats(128, rng), dtype=torch.float32)
    d = rotations.geodesic(q[:, None], q[None])
    gen = torch.Generator().manual_seed(0)
    i, j = sample_pairs(d, 800, "stratified", gen)
    assert (i != j).all()
    counts = np.bincount(np.digitize(d[i, j].numpy(), np.linspace(0, float(d.max()) + 1e-6, 9)[1:-1]), minlength=8)
    assert counts.min() == counts.max()  # equal count in each distance bin
    i, j = sample_pairs(d, 800, "random", gen)
    assert len(i) == 800 and (i < j).all()


def test_symmetric_loss_distance_in_torch_matches_numpy():
    rng = np.random.default_rng(1)
    p, q = rotations.random_quats(50, rng), rotations.random_quats(50, rng)
    g = symmetry.group_quats("D2")
    t = symmetry.symmetric_geodesic(torch.tensor(p), torch.tensor(q), torch.tensor(g)).numpy()
    assert np.allclose(t, symmetry.symmetric_geodesic(p, q, g), atol=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny simulated set and a 2-epoch model (wiring only; learning is tested in test_learning.py)."""
    d = tmp_path_factory.mktemp("tiny")
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(d / "sim"), "--n", "120", "--box", "32", "--snr", "1",
                "--seed", "1"]) == 0
    assert cli(["train", "--particles", str(d / "sim" / "particles.star"), "--out", str(d / "model"), "--box", "32",
                "--width", "0.125", "--epochs", "2", "--batch", "16", "--threads", "2", "--preset", "paper"]) == 0
    return d


def test_training_writes_model_dir_and_resumes(tiny_run, tmp_path):
    m = tiny_run / "model"
    for f in ("config.json", "split.json", "best.pt", "last.pt", "log.csv"):
        assert (m / f).exists(), f
    split = json.loads((m / "split.json").read_text())
    assert {len(split[k]["rows"]) for k in ("train", "val", "test")} == {60, 20, 40}
    assert not set(split["train"]["rows"]) & set(split["test"]["rows"])
    log = (m / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,loss,train_median_rad,val_median_rad") and len(log) == 3
    # resume: the same options continue from epoch 2 to 3; other options are refused
    import shutil

    shutil.copytree(m, tmp_path / "m")
    args = ["train", "--particles", str(tiny_run / "sim" / "particles.star"), "--out", str(tmp_path / "m"), "--box", "32",
            "--width", "0.125", "--batch", "16", "--resume", "--preset", "paper"]
    assert cli(args + ["--epochs", "3"]) == 2  # another schedule: refused with a clear error, nothing written
    assert torch.load(tmp_path / "m" / "last.pt", weights_only=False)["epoch"] == 2
    assert cli(args + ["--epochs", "2"]) == 0  # same options: resumes at epoch 2 of 2, nothing left to do
    assert len((tmp_path / "m" / "log.csv").read_text().splitlines()) == 3


def test_resume_after_interruption(tiny_run, tmp_path):
    from cryoforum_plugin.formats.star import read_star
    from cryoforum_plugin.train.trainer import Trainer, TrainConfig

    ps = read_star(tiny_run / "sim" / "particles.star")
    cfg = TrainConfig(box=32, width=0.125, epochs=3, batch=16)
    from cryoforum_plugin.progress import Events

    class StopInEpoch2(Events):
        calls = 0

        def check_abort(self):  # polled once per training step
            self.calls += 1
            if self.calls == 5:  # 4 steps per epoch: dies during the second epoch
                raise KeyboardInterrupt

    t = Trainer(ps, tmp_path / "m", cfg, torch.device("cpu"), progress=False, events=StopInEpoch2())
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert torch.load(tmp_path / "m" / "last.pt", weights_only=False)["epoch"] == 1  # last complete epoch
    t2 = Trainer(ps, tmp_path / "m", cfg, torch.device("cpu"), progress=False)
    assert t2.resume() and t2.epoch == 1
    t2.train()
    assert len((tmp_path / "m" / "log.csv").read_text().splitlines()) == 4  # header + 3 epochs


def test_streamed_training_with_loader_processes_equals_cached_training(tiny_run, tmp_path):
    """A set too large for the cache is streamed by loader processes: same batches, same order, same model."""
    from cryoforum_plugin.formats.star import read_star
    from cryoforum_plugin.train.trainer import Trainer, TrainConfig

    ps = read_star(tiny_run / "sim" / "particles.star")
    cfg = TrainConfig(box=32, width=0.125, epochs=2, batch=16, augment_psi=True)
    logs = {}
    for name, kwargs in {"cached": {}, "streamed": {"cache_gb": 0, "workers": 2}}.items():
        t = Trainer(ps, tmp_path / name, cfg, torch.device("cpu"), progress=False, **kwargs)
        assert (t.source._cache is None) == (name == "streamed")
        t.train()
        rows = list(csv.DictReader((tmp_path / name / "log.csv").open()))
        logs[name] = [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
    assert len(logs["cached"]) == 2 and logs["cached"] == logs["streamed"]
    state = {k: torch.load(tmp_path / k / "last.pt", weights_only=False)["model"] for k in logs}
    assert all(torch.equal(state["cached"][k], state["streamed"][k]) for k in state["cached"])


def test_predict_outputs_keep_columns_and_uids(tiny_run):
    d = tiny_run
    assert cli(["predict", "--model", str(d / "model"), "--particles", str(d / "sim" / "particles.star"),
                "--out", str(d / "pred"), "--format", "both", "--tta", "2"]) == 0
    blocks = starfile.read(d / "pred" / "predicted.star")
    orig = starfile.read(d / "sim" / "particles.star")
    p = blocks["particles"]
    assert len(p) == 120 and list(blocks["optics"].columns) == list(orig["optics"].columns)
    for c in ("rlnCryoforumPriorAngleRot", "rlnCryoforumMaxDispersion", "rlnCryoforumTraceDispersion",
              "rlnParticleFigureOfMerit", "rlnDefocusU", "rlnRandomSubset", "rlnCryoforumUid"):
        assert c in p, c
    assert (p["rlnCryoforumTraceDispersion"] <= 0).all() and (p["rlnCryoforumMaxDispersion"] <= 0).all()
    assert (p["rlnCryoforumTraceDispersion"] <= p["rlnCryoforumMaxDispersion"] + 1e-9).all()
    assert p["rlnParticleFigureOfMerit"].between(0, 1).all()
    assert np.allclose(p["rlnCryoforumPriorAngleTilt"], orig["particles"]["rlnAngleTilt"], atol=1e-4)
    from cryosparc.dataset import Dataset

    cs = Dataset.load(str(d / "pred" / "predicted.cs"))
    side = Dataset.load(str(d / "pred" / "predicted_uncertainty.cs"))
    assert (cs["uid"] == p["rlnCryoforumUid"].to_numpy(np.uint64)).all() and (side["uid"] == cs["uid"]).all()
    q_star = rotations.relion_euler_to_quat(p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"])
    assert rotations.geodesic(q_star, rotations.cryosparc_pose_to_quat(cs["alignments3D/pose"])).max() < 1e-5


def test_training_needs_poses(tmp_path, tiny_run):
    from cryoforum_plugin.formats.star import read_star
    from cryoforum_plugin.train.trainer import Trainer, TrainConfig

    ps = read_star(tiny_run / "sim" / "particles.star")
    ps.quat[5] = np.nan
    with pytest.raises(CryoforumError, match=r"row 6.*need poses"):
        Trainer(ps, tmp_path, TrainConfig(box=32), torch.device("cpu"))
