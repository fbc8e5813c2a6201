"""The README's main job in its tiny configuration: every step runs and the report shows the numbers."""

import json

from cryoforum_plugin.cli import main as cli


def test_demo_tiny(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "d"), "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "cryo-forum demo summary" in out and "resolution, predicted, filtered" in out
    log = json.loads((tmp_path / "d" / "run.log").read_text())
    assert set(log["steps"]) == {"simulate", "train", "predict", "reference", "refine", "filter", "report"}
    assert log["torch"] and log["device"] and log["settings"]["n"] == 600
    report = json.loads((tmp_path / "d" / "report" / "report.json").read_text())
    assert report["headline"]["particles"] == 150 and "true poses" in report["reconstructions"]
    # the whole chain: the refinement against the reconstruction of the training particles fixes the poses
    assert report["errors_refined_good"]["median_deg"] < min(5.0, report["errors_good"]["median_deg"])
    assert "refined" in report["reconstructions"] and "median error after refinement" in out
    assert (tmp_path / "d" / "report" / "report.html").stat().st_size > 10000
