"""The RELION External job adapter, run by real relion_pipeliner (RELION 3.1) and directly for failure paths."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from conftest import run_relion

pytestmark = pytest.mark.relion
ROOT = Path(__file__).resolve().parents[1]


def _exe():
    exe = Path(sys.executable).with_name("cryoforum-relion")
    assert exe.exists(), "the cryoforum-relion console script is installed by `pip install -e .`"
    return str(exe)


def _project(tmp_path, relion_set):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("parts_noisy.star", "parts_noisy.mrcs", "map.mrc"):
        shutil.copy(relion_set["dir"] / name, proj / name)
    (proj / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n \n")
    return proj


FAST = "--width 0.125 --batch 32 --test-fraction 0.2 --preset paper"


def test_pipeliner_runs_the_external_job_and_registers_nodes(relion_set, tmp_path):
    proj = _project(tmp_path, relion_set)
    run_relion(["relion_pipeliner", "--addJob", "Import", "--addJobOptions",
                "do_raw == No;do_other == Yes;fn_in_other == parts_noisy.star;node_type == Particles STAR file (.star)"],
               cwd=proj)
    opts = (f"fn_exe == {_exe()};in_part == Import/job001/parts_noisy.star;in_3dref == map.mrc;param1_label == mode;"
            "param1_value == train_predict;param2_label == epochs;param2_value == 1;param3_label == box;"
            f"param3_value == 32;param4_label == drop;param4_value == 0.25;nr_threads == 2;"
            f"other_args == {FAST} --global-search all")
    run_relion(["relion_pipeliner", "--addJob", "External", "--addJobOptions", opts], cwd=proj)
    run_relion(["relion_pipeliner", "--RunJobs", "Import/job001/", "--sec_wait_after", "1"], cwd=proj)
    run_relion(["relion_pipeliner", "--RunJobs", "External/job002/", "--sec_wait_after", "1"], cwd=proj)
    job = proj / "External" / "job002"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), (job / "run.err").read_text()
    pipeline = starfile.read(proj / "default_pipeline.star", always_dict=True)
    procs = pipeline["pipeline_processes"]
    assert int(procs.loc[procs["rlnPipeLineProcessName"] == "External/job002/", "rlnPipeLineProcessStatus"].iloc[0]) == 2
    nodes = dict(zip(pipeline["pipeline_nodes"]["rlnPipeLineNodeName"], pipeline["pipeline_nodes"]["rlnPipeLineNodeType"]))
    for name, kind in (("predicted.star", 3), ("refined.star", 3), ("confident.star", 3), ("rejected.star", 3),
                       ("confident_map.mrc", 6), ("model/best.pt", 8)):
        assert nodes.get(f"External/job002/{name}") == kind, name
    # the External job's 3D reference refined the network's poses (and found the shifts) on RELION's particles
    from cryoforum_plugin.infer.metrics import geodesic_errors
    from cryoforum_plugin.formats.star import read_star

    refined, predicted = read_star(job / "refined.star"), read_star(job / "predicted.star")
    refined_err = np.degrees(geodesic_errors(refined.quat, relion_set["quat"]))
    predicted_err = np.degrees(geodesic_errors(predicted.quat, relion_set["quat"]))
    # every particle has the network's pose in predicted.star, and the refinement ends within 5° whatever the
    # network's accuracy (this one-epoch network is near chance; a better one must pass too)
    assert len(predicted) == len(refined) == 400 and np.isfinite(predicted.quat).all()
    assert np.median(refined_err) < 5 and np.median(refined_err) <= np.median(predicted_err) + 1.0
    shift_px = np.linalg.norm(refined.shift_A - relion_set["shift_A"], axis=1) / relion_set["pixel_size"]
    assert np.median(shift_px) < 1.0
    # real relion_reconstruct of the refined STAR matches the true map about as well as the true poses do
    import mrcfile

    from cryoforum_plugin.physics.fsc import fsc_curve

    run_relion(["relion_reconstruct", "--i", "External/job002/refined.star", "--o", "refined.mrc", "--ctf"], cwd=proj)
    run_relion(["relion_reconstruct", "--i", "parts_noisy.star", "--o", "true_poses.mrc", "--ctf"], cwd=proj)
    truth = relion_set["map"]
    fsc_refined = fsc_curve(mrcfile.read(proj / "refined.mrc"), truth)
    fsc_true = fsc_curve(mrcfile.read(proj / "true_poses.mrc"), truth)
    assert fsc_refined[2:16].mean() > 0.9 * fsc_true[2:16].mean(), (fsc_refined[:16], fsc_true[:16])
    confident = starfile.read(job / "confident.star")
    assert "optics" in confident and len(confident["particles"]) == 300  # 400 - 25 %
    # a following RELION job consumes the confident particles
    run_relion(["relion_reconstruct", "--i", "External/job002/confident.star", "--o", "conf.mrc", "--ctf"], cwd=proj)
    assert (proj / "conf.mrc").stat().st_size > 64**3 * 4
    # predict mode with the model of the first job, from a second External job
    opts2 = (f"fn_exe == {_exe()};in_part == Import/job001/parts_noisy.star;param1_label == mode;"
             "param1_value == predict;param2_label == model;param2_value == External/job002/model;"
             "param3_label == reconstruct;param3_value == no;nr_threads == 2")
    run_relion(["relion_pipeliner", "--addJob", "External", "--addJobOptions", opts2], cwd=proj)
    run_relion(["relion_pipeliner", "--RunJobs", "External/job003/", "--sec_wait_after", "1"], cwd=proj)
    assert (proj / "External" / "job003" / "RELION_JOB_EXIT_SUCCESS").exists()
    assert not (proj / "External" / "job003" / "model").exists()


def _run_adapter(proj, *args):
    return subprocess.run([_exe(), "--o", "External/job009/", *args], cwd=proj, capture_output=True, text=True)


def test_missing_input_bad_parameter_and_abort(relion_set, tmp_path):
    proj = _project(tmp_path, relion_set)
    job = proj / "External" / "job009"
    r = _run_adapter(proj, "--in_parts", "nope.star", "--mode", "train")
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and "nope.star" in r.stderr and "Fix:" in r.stderr
    r = _run_adapter(proj, "--in_parts", "parts_noisy.star", "--epochs", "many")
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert "epochs" in r.stderr
    r = _run_adapter(proj, "--in_parts", "parts_noisy.star", "--mode", "predict")
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and "model" in r.stderr
    (job / "RELION_JOB_ABORT_NOW").touch()
    r = _run_adapter(proj, "--in_parts", "parts_noisy.star", "--mode", "train_predict", "--epochs", "1", "--box", "32",
                     *FAST.split())
    assert (job / "RELION_JOB_EXIT_ABORTED").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "confident.star").exists() and not (job / "RELION_OUTPUT_NODES.star").exists()
    assert [p.name for p in job.rglob(".*") if p.is_file()] == []  # no temporary half-written files left


def test_job_star_matches_plugin_yaml_and_loads_in_relion(relion, tmp_path):
    sys.path.insert(0, str(ROOT))
    from relion_external.cryoforum_relion import job_star_text

    assert (ROOT / "relion_external" / "cryoforum_job.star").read_text() == job_star_text()
    (tmp_path / "default_pipeline.star").write_text(
        "\n# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter 1\n \n")
    shutil.copy(ROOT / "relion_external" / "cryoforum_job.star", tmp_path / "job.star")
    run_relion(["relion_pipeliner", "--addJobFromStar", "job.star"], cwd=tmp_path)
    values = starfile.read(tmp_path / "External" / "job001" / "job.star", always_dict=True)["joboptions_values"]
    opts = dict(zip(values["rlnJobOptionVariable"], values["rlnJobOptionValue"]))
    assert opts["param1_label"] == "mode" and opts["fn_exe"] == "cryoforum-relion"
