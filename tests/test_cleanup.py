"""Clean-up: selection rules, calibration, metrics, and the filter/report commands on real outputs."""

import json

import numpy as np
import pytest
import starfile

from cryoforum_plugin.cleanup import auroc, calibrate_threshold, keep_by_quantile, risk_coverage, spearman
from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import DEFAULT_MAP
from cryoforum_plugin.errors import CryoforumError


def test_quantile_drops_the_most_uncertain():
    score = np.array([-5.0, -0.1, -3.0, -0.5, -9.0, -0.2, -1.0, -2.0])  # near 0 = uncertain
    keep = keep_by_quantile(score, 0.25)
    assert keep.sum() == 6 and not keep[1] and not keep[5]
    with pytest.raises(CryoforumError):
        keep_by_quantile(score, 1.5)


def test_metrics_on_known_relations():
    rng = np.random.default_rng(0)
    err = rng.uniform(0, 3, 2000)
    score = -1.0 / (err + 0.1) + rng.normal(0, 0.05, 2000)  # monotone in the error, plus noise
    assert spearman(score, err) > 0.9
    assert auroc(score, err > 1.0) > 0.95 and abs(auroc(rng.normal(size=2000), err > 1.0) - 0.5) < 0.05
    rc = risk_coverage(score, err)
    assert rc[0]["median_error_rad"] < rc[-1]["median_error_rad"]
    t = calibrate_threshold(score, err, 0.5)
    kept = score <= t
    assert np.median(err[kept]) <= 0.5 and kept.sum() > 100


def test_filter_and_report_commands(tmp_path):
    d = tmp_path
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(d / "sim"), "--n", "150", "--box", "32", "--snr", "1",
                "--junk-fraction", "0.2", "--seed", "2"]) == 0
    assert cli(["train", "--particles", str(d / "sim" / "particles.star"), "--out", str(d / "m"), "--box", "32",
                "--width", "0.125", "--epochs", "1", "--batch", "32"]) == 0
    assert cli(["predict", "--model", str(d / "m"), "--particles", str(d / "sim" / "particles.cs"),
                "--out", str(d / "p"), "--project-dir", str(d / "sim")]) == 0
    assert cli(["filter", str(d / "p" / "predicted.cs"), "--out", str(d / "f"), "--format", "both",
                "--project-dir", str(d / "sim")]) == 0
    summary = json.loads((d / "f" / "filter.json").read_text())
    assert summary["kept"] + summary["rejected"] == 150 and summary["rejected"] == round(0.25 * 150)
    from cryosparc.dataset import Dataset

    orig = Dataset.load(str(d / "sim" / "particles.cs"))
    kept = Dataset.load(str(d / "f" / "confident.cs"))
    rej = Dataset.load(str(d / "f" / "rejected.cs"))
    assert set(kept["uid"]) | set(rej["uid"]) == set(orig["uid"]) and not set(kept["uid"]) & set(rej["uid"])
    assert set(kept["blob/path"]) == set(orig["blob/path"])  # the same images (project-relative), not a re-import
    from cryoforum_plugin.particles import read_cs

    assert set(read_cs(d / "f" / "rejected.cs", project_dir=d / "sim").image_path) == set(
        read_cs(d / "sim" / "particles.cs").image_path)
    star = starfile.read(d / "f" / "confident.star")["particles"]
    assert len(star) == len(kept)
    # report on the truth with junk labels
    # the embedded map is 64 px and these particles 32 px: a clear error, then the report without the map
    assert cli(["report", "--predicted", str(d / "p" / "predicted.cs"), "--truth", str(d / "sim" / "truth.star"),
                "--out", str(d / "r"), "--map", str(DEFAULT_MAP)]) == 2
    assert cli(["report", "--predicted", str(d / "p" / "predicted.cs"), "--truth", str(d / "sim" / "truth.star"),
                "--out", str(d / "r2"), "--project-dir", str(d / "sim")]) == 0
    rep = json.loads((d / "r2" / "report.json").read_text())
    assert rep["junk"]["junk_particles"] == 30
    assert set(rep["reconstructions"]) == {"true poses", "predicted", "predicted, filtered",
                                           "predicted, uncertainty-weighted"}
    html = (d / "r2" / "report.html").read_text()
    assert html.count("data:image/png;base64") == 4  # self-contained
    with pytest.raises(SystemExit):
        cli(["filter", str(d / "p" / "predicted.cs"), "--drop", "2"])  # out of range: argparse error


def test_target_error_needs_model(tmp_path):
    assert cli(["filter", str(tmp_path / "x.star"), "--target-error", "5"]) == 2
