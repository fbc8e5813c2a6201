"""The README's main job in its tiny configuration: every step runs and the report shows the numbers."""

import json

from cryoforum_plugin import manifest
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.commands.demo import DEMO_DATA
from cryoforum_plugin.train.model_dir import ModelDir


def test_demo_tiny(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "d"), "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "cryo-forum demo summary" in out and "resolution, predicted, filtered" in out
    log = json.loads((tmp_path / "d" / "run.log").read_text())
    assert set(log["steps"]) == {"simulate", "job", "report"}
    assert log["torch"] and log["device"] and log["settings"]["n"] == 600
    # the demo runs the job a user runs: the RELION job's outputs, and its defaults except the smoke-test ones
    job = tmp_path / "d" / "job"
    for name in ("predicted.star", "refined.star", "confident.star", "rejected.star", "confident_map.mrc",
                 "filter.json", "refine.json", "model/best.pt"):
        assert (job / name).exists(), name
    assert log["options_changed_from_the_defaults"] == DEMO_DATA["tiny"]["options"]
    # the default statistic (auto) is mismatch for a job that refined against a map
    assert manifest.defaults("filter")["statistic"] == "auto"
    assert json.loads((job / "filter.json").read_text())["statistic"] == "mismatch"
    report = json.loads((tmp_path / "d" / "report" / "report.json").read_text())
    test_split = ModelDir(tmp_path / "d" / "job" / "model").split_uids("test")
    assert report["headline"]["particles"] == len(test_split) > 100 and "true poses" in report["reconstructions"]
    # the whole chain: the refinement against the reconstruction of the training particles fixes the poses
    assert report["errors_refined_good"]["median_deg"] < min(5.0, report["errors_good"]["median_deg"])
    assert "refined" in report["reconstructions"] and "median error after refinement" in out
    assert (tmp_path / "d" / "report" / "report.html").stat().st_size > 10000
