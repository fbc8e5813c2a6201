"""What a whole job (``pipeline_job.pipeline``) does with half-sets and poses, through its real outputs (STAR and .cs):

- gold standard: every particle gets ONE half-set (the input's where it has one, else keyed by its uid); the
  training map, the reference's half-maps and the refinement all use it (each particle is matched against the
  half-map of its own half only, RELION's convention; the two half-maps hold disjoint particles, so the FSC
  weighting comes from independent halves), and it is written to every output;
- three pose sets: the input's (consensus) poses stay in the prior columns, the network's prediction in the
  predicted columns, the refined pose in rlnAngle* / alignments3D/pose;
- ``--target-error`` is calibrated on the final poses against the input's poses, never against the prediction.

The network is a 1-epoch wiring model (near chance): the tests need its predictions to differ from the input.
"""

from __future__ import annotations

import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.pipeline import job as pipeline_job
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.infer.metrics import geodesic_errors
from cryoforum_plugin.train.model_dir import ModelDir
from cryoforum_plugin.formats.columns import PREDICTED_ANGLE_COLUMNS, PRIOR_ANGLE_COLUMNS
from cryoforum_plugin.formats.files import read_particles
from cryoforum_plugin.formats.particles import half_sets, uid_half_sets
from cryoforum_plugin.progress import Events
from cryoforum_plugin.refine.driver import RefineResult

N, GIVEN = 120, 40  # particles; the first GIVEN keep the input's half-set (rlnRandomSubset), the others have none
OPTS = {"preset": "paper", "epochs": 1, "box": 32, "width": 0.125, "batch": 16, "pretrain_steps": 2,
        "pretrain_log_every": 1, "device": "cpu", "workers": 0, "drop": 0.25}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A train-predict-refine-select job on simulated particles whose input STAR gives a half-set to the first
    GIVEN particles only; every reconstruction and refinement call records the uids and half-sets it got."""
    d = tmp_path_factory.mktemp("job")
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(d / "sim"), "--n", str(N), "--box", "32", "--snr", "1",
                "--max-shift", "1", "--seed", "3"]) == 0
    blocks = starfile.read(d / "sim" / "particles.star")
    parts = blocks["particles"]
    given = parts["rlnRandomSubset"].to_numpy().copy()
    given[GIVEN:] = 0
    parts["rlnRandomSubset"] = given
    starfile.write(blocks, d / "sim" / "input.star")
    ps = read_particles(d / "sim" / "input.star")
    calls = []
    mp = pytest.MonkeyPatch()
    from cryoforum_plugin.physics import reconstruct as reconstruction
    from cryoforum_plugin.refine import driver

    def spy(module, name, what):
        real = getattr(module, name)

        def wrapper(ps, *args, **kwargs):
            calls.append({"what": what, "uid": ps.uid.copy(), "given": ps.half_set.copy(), "used": half_sets(ps)})
            return real(ps, *args, **kwargs)

        mp.setattr(module, name, wrapper)

    spy(reconstruction, "reconstruct", "reconstruct")
    spy(driver, "refine", "refine")
    try:
        opts = pipeline_options.options(**OPTS)
        result = pipeline_job.pipeline(opts, train_set=ps, predict_set=ps, model_dir=d / "model", events=Events())
    finally:
        mp.undo()
    out, src = d / "out", d / "sim" / "input.star"
    out.mkdir()
    steps.write_predictions(result.predicted, out, src, "both")
    steps.write_refined(result.refined, result.refinement, out, src, "both")
    steps.write_selection(result.final, result.selection, out, src, "both")
    return {"dir": d, "input": ps, "given": given, "calls": calls, "result": result, "out": out}


def _table(path):
    return starfile.read(path)["particles"]


def test_one_half_set_per_particle_in_every_step_and_every_output(job):
    """No particle is matched against a map it did not build, nor built into both half-maps: the pipeline assigns
    the half-sets once (the input's kept, the rest by uid), and every reconstruction (training map, reference
    half-maps) and the refinement receive and use exactly that assignment, which every output carries."""
    ps, given = job["input"], job["given"]
    expected = np.where(given > 0, given, uid_half_sets(ps.uid))
    assert set(np.unique(expected[GIVEN:])) == {1, 2}
    by_uid = dict(zip(ps.uid.tolist(), expected.tolist()))
    whats = [c["what"] for c in job["calls"]]
    assert "refine" in whats and whats.count("reconstruct") >= 2, whats  # training map, reference half-maps
    for c in job["calls"]:
        assert np.isin(c["given"], (1, 2)).all(), f"{c['what']} got particles without a half-set"
        assert np.array_equal(c["used"], c["given"]), c["what"]
        assert np.array_equal(c["used"], [by_uid[u] for u in c["uid"].tolist()]), c["what"]
    # the reference's two half-maps hold disjoint particles, each exactly the refined particles of its half
    ref = [c for c in job["calls"] if c["what"] == "reconstruct"][-1]
    refine = [c for c in job["calls"] if c["what"] == "refine"][0]
    for h in (1, 2):
        built = set(ref["uid"][ref["used"] == h].tolist())
        matched = set(refine["uid"][refine["used"] == h].tolist())
        assert built and built == matched
        assert not built & set(ref["uid"][ref["used"] == 3 - h].tolist())
    # every output: STAR rlnRandomSubset and .cs alignments3D/split (0-based)
    out = job["out"]
    for stem in ("predicted", "refined", "confident", "rejected"):
        table = _table(out / f"{stem}.star")
        uids = table["rlnCryoforumUid"].to_numpy(np.uint64).tolist()
        assert np.array_equal(table["rlnRandomSubset"].to_numpy(), [by_uid[u] for u in uids]), stem
        cs = Dataset.load(str(out / f"{stem}.cs"))
        assert np.array_equal(np.asarray(cs["alignments3D/split"]) + 1, [by_uid[int(u)] for u in cs["uid"]]), stem
    # the input's half-sets are kept unchanged (the first GIVEN particles)
    refined = _table(out / "refined.star")
    assert np.array_equal(refined["rlnRandomSubset"].to_numpy()[:GIVEN], given[:GIVEN])


def test_outputs_keep_the_input_poses_the_prediction_and_the_refined_poses(job):
    """refined/confident/rejected keep the input file's angles in the prior columns and predicted.star's angles
    in the predicted columns; rlnAngle* holds the refined pose; the same in the .cs outputs."""
    out, d = job["out"], job["dir"]
    src = _table(d / "sim" / "input.star")
    q_input = rotations.relion_euler_to_quat(src["rlnAngleRot"], src["rlnAngleTilt"], src["rlnAnglePsi"])
    pred = _table(out / "predicted.star")
    q_pred = rotations.relion_euler_to_quat(pred["rlnAngleRot"], pred["rlnAngleTilt"], pred["rlnAnglePsi"])
    assert np.degrees(np.median(geodesic_errors(q_pred, q_input))) > 20  # the prediction differs from the input
    refined = job["result"].refined
    assert np.degrees(np.median(geodesic_errors(refined.quat, q_pred))) > 1  # and the refinement moved it
    row = {u: i for i, u in enumerate(src["rlnCryoforumUid"].to_numpy(np.uint64).tolist())}
    for stem in ("predicted", "refined", "confident", "rejected"):
        table = _table(out / f"{stem}.star")
        rows = [row[u] for u in table["rlnCryoforumUid"].to_numpy(np.uint64).tolist()]

        def angles(columns):
            return rotations.relion_euler_to_quat(*(table[c].to_numpy() for c in columns))

        assert geodesic_errors(angles(PRIOR_ANGLE_COLUMNS), q_input[rows]).max() < 1e-4, stem
        assert geodesic_errors(angles(PREDICTED_ANGLE_COLUMNS), q_pred[rows]).max() < 1e-4, stem
        if stem != "predicted":
            main = angles(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
            assert geodesic_errors(main, refined.quat[rows]).max() < 1e-4, stem
        cs = read_particles(out / f"{stem}.cs")
        assert geodesic_errors(cs.prior_quat, q_input[rows]).max() < 1e-4, stem
        assert geodesic_errors(cs.predicted_quat, q_pred[rows]).max() < 1e-4, stem
        fields = set(Dataset.load(str(out / f"{stem}.cs")).fields())
        assert {"cryoforum/prior_pose", "cryoforum/predicted_pose"} <= fields, stem


def _refined_to(job, monkeypatch, poses) -> tuple:
    """``steps.refine`` of the job's predicted set with a stub refinement that returns ``poses(predicted)``."""
    from cryoforum_plugin.refine import driver

    predicted = job["result"].predicted

    def stub(ps, reference, **kwargs):
        n = len(ps)
        return RefineResult(poses(ps).copy(), ps.shift_A.copy(), *[np.ones(n)] * 4, np.zeros(n, bool), 1.0)

    monkeypatch.setattr(driver, "refine", stub)
    refined, _ = steps.refine(predicted, job["result"].reference)
    return refined, ModelDir(job["dir"] / "model")


def test_target_error_is_calibrated_on_the_final_poses_against_the_input_poses(job, monkeypatch):
    """A refinement that lands exactly on the input's poses has zero validation error, so any target error is
    met; one that keeps the (near-chance) prediction has the network's error, whatever its distance to the
    prediction (zero): the calibration measures final vs input, not final vs predicted."""
    refined, model = _refined_to(job, monkeypatch, lambda ps: ps.prior_quat)
    rows, err = steps._validation_errors(refined, model)
    assert len(rows) >= 10 and err.max() < 1e-6
    assert np.degrees(np.median(geodesic_errors(refined.quat, job["result"].predicted.quat))) > 20
    selection = steps.select(refined, target_error=2.0, model_dir=model)
    assert selection.summary["mode"] == "target_error" and selection.kept > 0
    # the refinement kept the prediction: the error is the network's (far above the target), so no threshold
    stuck, model = _refined_to(job, monkeypatch, lambda ps: ps.quat)
    rows, err = steps._validation_errors(stuck, model)
    assert np.degrees(np.median(err)) > 20
    assert np.allclose(err, geodesic_errors(stuck.quat[rows], job["input"].quat[rows]))
    with pytest.raises(CryoforumError, match="no threshold"):
        steps.select(stuck, target_error=2.0, model_dir=model)
