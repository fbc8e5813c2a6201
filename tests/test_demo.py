"""The README's main job in its tiny configuration: every step runs and the report shows the numbers."""

import json

from cryoforum_plugin.cli import main as cli


def test_demo_tiny(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "d"), "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "cryo-forum demo summary" in out and "resolution, predicted, filtered" in out
    log = json.loads((tmp_path / "d" / "run.log").read_text())
    assert set(log["steps"]) == {"simulate", "train", "predict", "filter", "report"}
    assert log["torch"] and log["device"] and log["settings"]["n"] == 600
    report = json.loads((tmp_path / "d" / "report" / "report.json").read_text())
    assert report["headline"]["particles"] == 150 and "true poses" in report["reconstructions"]
    assert (tmp_path / "d" / "report" / "report.html").stat().st_size > 10000
