"""Clean-up: selection rules, calibration, metrics, and the filter/report commands on real outputs."""

import json

import numpy as np
import pytest
import starfile

from cryoforum_plugin.infer.select import auroc, calibrate_threshold, keep_by_quantile, risk_coverage, spearman
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
                "--width", "0.125", "--epochs", "1", "--batch", "32", "--preset", "paper"]) == 0
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
    from cryoforum_plugin.formats.cs import read_cs

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


def test_cs_prediction_weights_and_target_error_match_star(tmp_path):
    """A predicted .cs (typed fields in cryoforum/* fields, or only the uid-keyed sidecar) gives the same
    `reconstruct --weights rlnParticleFigureOfMerit` weights and the same `filter --target-error` selection as
    the equivalent predicted STAR."""
    import dataclasses

    from cryosparc.dataset import Dataset

    from cryoforum_plugin.physics import rotations
    from cryoforum_plugin.infer.select import read_uncertainty
    from cryoforum_plugin.commands.reconstruct import particle_weights
    from cryoforum_plugin.formats.cs import write_cs
    from cryoforum_plugin.formats.files import read_particles
    from cryoforum_plugin.formats.star import write_star

    d = tmp_path
    n = 80
    assert cli(["simulate", str(DEFAULT_MAP), "--out", str(d / "sim"), "--n", str(n), "--box", "24", "--snr", "1",
                "--seed", "5"]) == 0
    truth = read_particles(d / "sim" / "particles.star")
    rng = np.random.default_rng(1)
    err_deg = rng.uniform(0, 60, n)  # predicted = truth rotated by err_deg about a random axis
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    half = np.radians(err_deg) / 2
    turn = np.concatenate([np.cos(half)[:, None], np.sin(half)[:, None] * axis], 1)
    trace = -np.round((61 - err_deg) * 2) / 2  # near 0 = uncertain = large error; exact in float32 and %.6f
    pred = dataclasses.replace(truth, quat=rotations.normalize(rotations.quat_mul(truth.quat, turn)),
                               prior_quat=truth.quat.copy(), uncertainty={"max": trace / 4, "trace": trace},
                               fom=np.round(rng.uniform(0, 1, n) * 64) / 64)
    (d / "p").mkdir()
    write_star(pred, d / "p" / "predicted.star")
    write_cs(pred, d / "p" / "predicted.cs", project_dir=d / "sim")
    # the cryoSPARC job's form: pose fields only, uncertainty and figure of merit in the sidecar
    ds = Dataset.load(str(d / "p" / "predicted.cs"))
    side = Dataset.allocate(n, [("cryoforum/max_dispersion", "f4"), ("cryoforum/trace_dispersion", "f4"),
                                ("cryoforum/fom", "f4")])
    side["uid"] = ds["uid"]
    for f in ("cryoforum/max_dispersion", "cryoforum/trace_dispersion", "cryoforum/fom"):
        side[f] = ds[f]
    ds.drop_fields(["cryoforum/max_dispersion", "cryoforum/trace_dispersion", "cryoforum/fom"])
    ds.save(str(d / "p" / "job.cs"))
    side.take(rng.permutation(n)).save(str(d / "p" / "job_uncertainty.cs"))  # keyed by uid, not by row

    sets = {name: read_particles(d / "p" / name, project_dir=d / "sim")
            for name in ("predicted.star", "predicted.cs", "job.cs")}
    assert sets["job.cs"].uncertainty is None and sets["job.cs"].prior_quat is not None
    for name, ps in sets.items():
        assert np.allclose(particle_weights(ps, "rlnParticleFigureOfMerit"), pred.fom, atol=1e-6), name
        assert np.array_equal(read_uncertainty(ps)["trace"], trace), name
    assert np.array_equal(particle_weights(sets["predicted.cs"], "cryoforum/fom"), pred.fom)
    with pytest.raises(CryoforumError):
        particle_weights(sets["predicted.cs"], "rlnNoSuchColumn")

    # a fake model directory: its validation split and symmetry are all that --target-error reads
    (d / "m").mkdir()
    (d / "m" / "split.json").write_text(json.dumps({"val": {"uids": [int(u) for u in truth.uid[::2]]}}))
    (d / "m" / "config.json").write_text(json.dumps({"config": {"sym": "C1"}}))
    kept = {}
    for name in sets:
        out = d / f"f_{name.replace('.', '_')}"
        assert cli(["filter", str(d / "p" / name), "--out", str(out), "--target-error", "20", "--model",
                    str(d / "m"), "--project-dir", str(d / "sim")]) == 0
        summary = json.loads((out / "filter.json").read_text())
        assert summary["mode"] == "target_error" and summary["validation_particles"] == n // 2
        confident = read_particles(summary["outputs"][0], project_dir=d / "sim")
        kept[name] = set(confident.uid.tolist())
        assert 0 < len(kept[name]) < n
        assert np.array_equal(confident.fom, pred.fom[np.isin(pred.uid, confident.uid)]) or name == "job.cs"
    assert kept["predicted.star"] == kept["predicted.cs"] == kept["job.cs"]
    assert np.median(err_deg[np.isin(pred.uid, list(kept["predicted.cs"]))]) <= 20

    # reconstruct --weights on the .cs runs end to end and gives the STAR's map
    import mrcfile

    for name in ("predicted.star", "predicted.cs"):
        assert cli(["reconstruct", str(d / "p" / name), "--out", str(d / f"{name}.mrc"), "--weights",
                    "rlnParticleFigureOfMerit", "--project-dir", str(d / "sim")]) == 0
    a, b = mrcfile.read(d / "predicted.star.mrc"), mrcfile.read(d / "predicted.cs.mrc")
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
