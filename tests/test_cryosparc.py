"""The cryoSPARC adapter with the real cryosparc-tools 5.0 client against a loopback CryoSPARC API
(tests/loopback_cryosparc.py), whose project directory holds the stacks the .cs rows point to."""

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from cryoforum_plugin.physics import rotations
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.formats.mrc import write_mrc
from cryoforum_plugin.physics.resample import resized_map

import loopback_cryosparc

FAST = ["--epochs", "1", "--box", "32", "--width", "0.125", "--device", "cpu", "--preset", "paper"]


@pytest.fixture()
def server(tmp_path, monkeypatch):
    proj = tmp_path / "P1"
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(proj / "J5"), "--n", "80", "--box", "32", "--snr", "1",
                "--seed", "3"]) == 0
    ds = Dataset.load(str(proj / "J5" / "particles.cs"))
    ds["blob/path"] = np.array([">J5/particles.mrcs"] * len(ds), dtype=object)  # project-relative, exported form
    ds.save(str(proj / "J5" / "J5_particles.cs"))
    no_pose = ds.copy().drop_fields([f for f in ds.fields() if f.startswith("alignments3D")])
    no_pose.save(str(proj / "J5" / "J5_extracted.cs"))
    vol, apix = resized_map(DEFAULT_MAP, 32)  # a refinement's volume output: map/path relative to the project
    (proj / "J9").mkdir()
    write_mrc(proj / "J9" / "J9_volume_map.mrc", vol.numpy(), apix)
    volume = Dataset.allocate(1, [("map/path", "O"), ("map/psize_A", "f4"), ("map/shape", "u4", (3,))])
    volume["map/path"] = np.array(["J9/J9_volume_map.mrc"], dtype=object)
    volume["map/psize_A"] = apix
    volume["map/shape"] = np.array([[32, 32, 32]])
    volume.save(str(proj / "J9" / "J9_volume.cs"))
    srv, state, url = loopback_cryosparc.start(proj)
    state.add_source_job("J5", "particles", proj / "J5" / "J5_particles.cs")
    state.add_source_job("J7", "particles", proj / "J5" / "J5_extracted.cs")
    state.add_source_job("J9", "volume", proj / "J9" / "J9_volume.cs", type_="volume")
    monkeypatch.setenv("CRYOSPARC_EMAIL", "test@example.org")
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "secret")
    yield state, url, ds
    srv.shutdown()


def run(url, *args):
    return cli(["cryosparc", "--url", url, "--project", "P1", "--workspace", "W1", *args])


def test_train_predict_pushes_back_poses_subsets_and_uncertainty(server):
    state, url, ds = server
    assert run(url, "--train", "J5:particles", *FAST) == 0
    job = next(j for j in state.jobs.values() if j["spec"]["type"] == "snowflake")
    assert job["status"] == "completed"
    uid = job["uid"]
    pred = Dataset.load(str(state.datasets[(uid, "predicted")]))
    conf = Dataset.load(str(state.datasets[(uid, "confident")]))
    rej = Dataset.load(str(state.datasets[(uid, "rejected")]))
    assert set(pred["uid"]) == set(ds["uid"])  # the ORIGINAL particles: same uids
    assert set(conf["uid"]) | set(rej["uid"]) == set(ds["uid"]) and len(rej) == 20 and len(conf) == 60
    assert not set(conf["uid"]) & set(rej["uid"])
    q = rotations.cryosparc_pose_to_quat(pred["alignments3D/pose"])
    assert np.allclose(np.linalg.norm(q, axis=1), 1) and np.allclose(pred["alignments3D/shift"], ds["alignments3D/shift"], atol=1e-4)
    side = Dataset.load(str(state.project_dir / uid / "cryoforum_uncertainty.cs"))
    assert set(side["uid"]) == set(ds["uid"]) and (side["cryoforum/trace_dispersion"] <= 0).all()
    assert (state.project_dir / uid / "model" / "best.pt").exists()
    progress = [e for e in state.events if e.get("job") == uid and e["type"] == "text"]
    assert len(progress) == 1 and progress[0]["text"].startswith("done:")  # one updating line, not thousands
    assert len([i for i in state.images if i["job"] == uid]) == 3  # training curve, uncertainty, refinement plots
    assert (uid, "refined") in state.datasets  # refined by default against the training particles' reconstruction
    # predict-only with the model of the first job, on particles without poses
    assert run(url, "--predict", "J7:particles", "--model", str(state.project_dir / uid / "model"), "--device", "cpu") == 0
    second = max(state.jobs, key=lambda u: int(u[1:]))
    assert state.jobs[second]["status"] == "completed" and not (state.project_dir / second / "model").exists()


def test_inputs_without_poses_fail_clearly(server, capsys):
    state, url, _ = server
    assert run(url, "--train", "J7:particles", *FAST) == 2
    err = capsys.readouterr().err
    assert "the training particles have no alignments3D" in err and "Fix:" in err and "Traceback" not in err
    assert not any("running" in c for c in state.calls)  # refused before mark_running, by the build error
    job = max(state.jobs.values(), key=lambda j: j["uid_num"])
    assert job["status"] == "failed" and not any(k[0] == job["uid"] for k in state.datasets)


def test_server_error_during_save_marks_failed_without_outputs(server, capsys):
    state, url, _ = server
    state.fail_next["jobs.save_output"] = 500
    assert run(url, "--train", "J5:particles", *FAST) == 2
    job = max(state.jobs.values(), key=lambda j: j["uid_num"])
    assert job["status"] == "failed"
    assert not any(k[0] == job["uid"] for k in state.datasets)  # nothing half-saved
    assert any(e["type"] == "error" and "cryo-forum" in e["text"] for e in state.events)
    assert "CryoSPARC request failed" in capsys.readouterr().err


def test_dropped_connection_is_retried_and_a_dead_server_fails_cleanly(server, capsys):
    state, url, _ = server
    state.fail_next["jobs.load_input"] = 0  # the connection drops once: the client retries
    with pytest.warns(UserWarning, match="attempt 1/3"):
        assert run(url, "--train", "J5:particles", *FAST) == 0
    assert cli(["cryosparc", "--url", "http://127.0.0.1:9", "--project", "P1", "--workspace", "W1",
                "--train", "J5:particles"]) == 2
    assert "cannot connect to CryoSPARC" in capsys.readouterr().err


def test_non_default_engine_option_and_calibrated_threshold_reach_the_engine(server):
    """Every engine option is accepted (one declaration in plugin.yaml): a quaternion head, and the calibrated
    --target-error selection instead of the default 25 % drop."""
    import json

    state, url, ds = server
    assert run(url, "--train", "J5:particles", *FAST, "--head", "quat") == 0
    uid = max(state.jobs, key=lambda u: int(u[1:]))
    config = json.loads((state.project_dir / uid / "model" / "config.json").read_text())["config"]
    assert config["head"] == "quat" and config["epochs"] == 1
    # a target error no particle can miss keeps all of them; the default would have rejected 20
    assert run(url, "--predict", "J5:particles", "--model", str(state.project_dir / uid / "model"),
               "--device", "cpu", "--target-error", "180") == 0
    second = max(state.jobs, key=lambda u: int(u[1:]))
    assert second != uid and len(Dataset.load(str(state.datasets[(second, "rejected")]))) == 0
    assert len(Dataset.load(str(state.datasets[(second, "confident")]))) == len(ds)


def test_a_refusal_reports_the_servers_whole_reason(server, capsys):
    state, url, _ = server
    state.fail_next["jobs.mark_running"] = 422
    assert run(url, "--train", "J5:particles", *FAST) == 2
    err = capsys.readouterr().err
    assert "HTTP 422: injected server error" in err and "Traceback" not in err
    job = max(state.jobs.values(), key=lambda j: j["uid_num"])
    assert job["status"] == "failed" and not any(k[0] == job["uid"] for k in state.datasets)


def test_failed_upload_leaves_the_job_without_outputs(server):
    state, url, _ = server
    state.fail_next["projects.upload_file"] = 500
    assert run(url, "--train", "J5:particles", *FAST) == 2
    job = max(state.jobs.values(), key=lambda j: j["uid_num"])
    assert job["status"] == "failed" and not any(k[0] == job["uid"] for k in state.datasets)


def test_refinement_against_a_connected_volume_outputs_refined_poses(server):
    """The reference volume input slot: the predicted poses are refined against it and come back as the
    'refined' output, a selection of the original particles (same uids) with poses near the refinement's."""
    state, url, ds = server
    assert run(url, "--train", "J5:particles", *FAST, "--reference", "J9:volume", "--global-search", "all") == 0
    uid = max(state.jobs, key=lambda u: int(u[1:]))
    assert state.jobs[uid]["spec"]["inputs"]["reference"]["connections"][0]["job_uid"] == "J9"
    refined = Dataset.load(str(state.datasets[(uid, "refined")]))
    predicted = Dataset.load(str(state.datasets[(uid, "predicted")]))
    assert set(refined["uid"]) == set(ds["uid"])
    order = np.argsort(refined["uid"])
    truth = rotations.cryosparc_pose_to_quat(ds["alignments3D/pose"][np.argsort(ds["uid"])])
    err_refined = rotations.geodesic(rotations.cryosparc_pose_to_quat(refined["alignments3D/pose"][order]), truth)
    err_pred = rotations.geodesic(rotations.cryosparc_pose_to_quat(
        predicted["alignments3D/pose"][np.argsort(predicted["uid"])]), truth)
    assert np.degrees(np.median(err_refined)) < 5 < np.degrees(np.median(err_pred))
    conf = Dataset.load(str(state.datasets[(uid, "confident")]))
    assert np.allclose(conf["alignments3D/pose"], refined["alignments3D/pose"][np.isin(refined["uid"], conf["uid"])])


def test_cryosparc_predicts_new_particle_outputs_job_after_job(server, pretrained_from_map):
    """cryosparc-tools 5: a completed External job takes no more outputs (CryoSPARC refuses save_output unless the
    job is cleared, which deletes its outputs, and started again; the loopback server refuses it too), so every new
    particle output of a session gets its own predict-only External job with the same model."""
    from cryosparc.tools import CryoSPARC

    state, url, ds = server
    uids = []
    for source in ("J5:particles", "J7:particles"):  # two extractions, one after the other
        assert cli(["cryosparc", "--url", url, "--project", "P1", "--workspace", "W1", "--predict", source, "--model",
                    str(pretrained_from_map["model"]), "--device", "cpu", "--no-refine"]) == 0
        uids.append(max(state.jobs, key=lambda u: int(u[1:])))
    assert uids[0] != uids[1]
    for uid in uids:
        assert state.jobs[uid]["status"] == "completed"
        predicted = Dataset.load(str(state.datasets[(uid, "predicted")]))
        confident, rejected = (Dataset.load(str(state.datasets[(uid, name)])) for name in ("confident", "rejected"))
        assert sorted(predicted["uid"]) == sorted(ds["uid"])
        assert sorted(np.concatenate([confident["uid"], rejected["uid"]])) == sorted(ds["uid"])
    job = CryoSPARC(base_url=url).find_external_job("P1", uids[0])
    with pytest.raises(Exception, match="only while the job is running or waiting"):
        job.save_output("predicted", Dataset.load(str(state.datasets[(uids[0], "predicted")])))
