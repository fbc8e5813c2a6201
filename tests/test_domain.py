"""The domain check (``infer.domain``): a model reused on new particles says whether it fits them.

The model is ``pretrained_from_map`` (the default 70S-like map, 32 px at 8.71 Å, SNR 10; its domain.json written
by ``steps.write_domain_reference``, what ``steps.train`` calls, from its 60 validation particles). New sets are
simulated as its training set was (same box, pixel size, SNR, CTF and shifts), of the same map with other seeds
(held-out particles of the training data set: they fit) and of β-galactosidase resampled to the same pixel size
(another protein: it does not). Margins measured with benchmarks/domain_check.py (seeds 11-14, 1 and 2 threads):
same map signal_shape_low 0.00 (threshold 0.15), fom_below_model_p10 0.05-0.17 (threshold 0.3); β-galactosidase
signal_shape_low 0.31-0.32, fom_below_model_p10 0.93-1.00.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from cryoforum_plugin.cli import main as cli
from cryoforum_plugin.data import BETAGAL_MAP, DEFAULT_MAP
from cryoforum_plugin.formats.mrc import read_map, write_mrc
from cryoforum_plugin.formats.star import read_star
from cryoforum_plugin.infer import domain
from cryoforum_plugin.physics.resample import map_on_particle_grid
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.progress import Events
from cryoforum_plugin.sim.dataset import simulate
from cryoforum_plugin.train.model_dir import ModelDir

SIM = dict(box=32, snr=10.0, max_shift=2.0, progress=False)  # small_sim_set's settings (tests/conftest.py)
LIMIT = domain.THRESHOLDS


class Recorder(Events):
    """The job's events, kept: messages in ``lines``, progress dropped."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, text: str, final: bool = False) -> None:
        pass


@pytest.fixture(scope="module")
def model(pretrained_from_map, tmp_path_factory):
    """A copy of the pre-trained model with its domain.json (the session's model is left as it was)."""
    path = tmp_path_factory.mktemp("domain") / "model"
    shutil.copytree(pretrained_from_map["model"], path)
    events = Recorder()
    steps.write_domain_reference(pretrained_from_map["particles"], path, device="cpu", events=events)
    assert events.lines and "domain.json" in events.lines[0]
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """name -> particle STAR: the default map (same11, same12) and β-galactosidase at the same pixel size
    (bgal11, bgal12), 200 particles each; the default map at SNR 1 (ten times lower) and in a 40 px box (6.97 Å,
    the same field of view)."""
    d = tmp_path_factory.mktemp("domain_sets")
    _, apix = read_map(DEFAULT_MAP)
    bgal = d / "betagal_same_pixel.mrc"
    write_mrc(bgal, map_on_particle_grid(str(BETAGAL_MAP), 64, apix).numpy(), apix)
    out = {}
    for seed in (11, 12):
        simulate(DEFAULT_MAP, d / f"same{seed}", n=200, seed=seed, **SIM)
        simulate(bgal, d / f"bgal{seed}", n=200, seed=seed, **SIM)
        for name in (f"same{seed}", f"bgal{seed}"):
            out[name] = d / name / "particles.star"
    simulate(DEFAULT_MAP, d / "snr1", n=200, seed=13, **{**SIM, "snr": 1.0})
    simulate(DEFAULT_MAP, d / "box40", n=200, seed=13, **{**SIM, "box": 40})
    out.update(snr1=d / "snr1" / "particles.star", box40=d / "box40" / "particles.star")
    return out


def _check(path_or_set, model):
    ps = read_star(path_or_set) if not hasattr(path_or_set, "quat") else path_or_set
    events = Recorder()
    _, pred = steps.predict(ps, model, device="cpu", workers=0, events=events)
    return pred.domain_check, events.lines


def test_the_reference_holds_the_validation_particles_statistics(model, pretrained_from_map):
    ref = ModelDir(model).domain()
    n_val = len(pretrained_from_map["split"]["val"])
    assert ref["split"] == "val" and ref["particles"] == n_val and ref["fom"]["particles"] == n_val
    assert ref["grid_box"] == 32 and len(ref["signal"]["mean"]) == 17 and ref["fom"]["has_uncertainty"]
    # the figure of merit's scale is the validation median |trace|: its median there is 1 - 1/e
    assert abs(ref["fom"]["quantiles"][2] - (1 - np.exp(-1))) < 0.05
    assert abs(np.mean(ref["noise_shape"][1:]) - 1) < 1e-6 and ref["defocus"][0] < ref["defocus"][-1]


def test_held_out_particles_fit_and_another_protein_does_not(model, sets, pretrained_from_map):
    ps = pretrained_from_map["particles"]
    held_out = ps.subset(pretrained_from_map["split"]["test"])  # never trained on, nor used for the reference
    for name, target in (("test split", held_out), ("same11", sets["same11"]), ("same12", sets["same12"])):
        check, lines = _check(target, model)
        assert check["fits"] is True, (name, check)
        assert check["signal_shape_low"] < 0.5 * LIMIT["signal_shape"], (name, check)
        assert check["fom_below_model_p10"] < LIMIT["fom_low"] and 0.8 < check["snr_ratio"] < 1.25, (name, check)
        assert len(lines) == 1 and lines[0].startswith("[cryo-forum] domain check: the model fits"), lines
    for name in ("bgal11", "bgal12"):
        check, lines = _check(sets[name], model)
        assert check["fits"] is False, (name, check)
        assert check["signal_shape_low"] > 0.2 and check["fom_below_model_p10"] > 2 * LIMIT["fom_low"], (name, check)
        assert any("power spectrum" in r for r in check["reasons"]), check["reasons"]
        warnings = [line for line in lines if line.startswith("WARNING:")]
        assert len(lines) == 1 and len(warnings) == 1 and "does not fit" in warnings[0], lines
        assert "power spectrum" in warnings[0] and "predict.json" in warnings[0], warnings


def test_a_much_lower_snr_or_a_mislabelled_pixel_size_does_not_pass_silently(model, sets):
    check, _ = _check(sets["snr1"], model)  # ten times lower SNR than the training particles
    assert check["fits"] is False and check["snr_ratio"] < 0.5 * LIMIT["snr_ratio"], check
    assert any("signal-to-noise" in r for r in check["reasons"])
    ps = read_star(sets["same11"])  # the same images said to be 15 % finer: the protein shrinks on the model grid
    check, _ = _check(dataclasses.replace(ps, pixel_size=ps.pixel_size * 0.85), model)
    assert check["fits"] is False and check["signal_shape_low"] > 2 * LIMIT["signal_shape"], check
    # a finer pixel size that is right: prediction resamples to the model's grid, the check fits and says so
    check, lines = _check(sets["box40"], model)
    assert check["fits"] is True and any("resampled to the model's grid" in n for n in check["notes"]), check
    assert "note:" in lines[0] and "the particles (40 px at 6.967 Å) were resampled" in lines[0], lines


def test_a_model_trained_before_the_check_predicts_and_cannot_judge(pretrained_from_map, sets, tmp_path):
    old = tmp_path / "old_model"
    shutil.copytree(pretrained_from_map["model"], old, ignore=shutil.ignore_patterns("domain.json"))
    ps = read_star(sets["bgal11"])
    predicted, pred = steps.predict(ps, old, device="cpu", workers=0, events=Recorder())
    assert predicted is not None and len(pred.quat) == len(ps)
    check = pred.domain_check
    assert check["fits"] is None and check["reasons"][0].startswith("cannot judge: the model directory has no")
    assert domain.summary_line(check).startswith("[cryo-forum] domain check: cannot judge")
    steps.write_predictions(predicted, tmp_path / "out", sets["bgal11"], "star", domain_check=check)
    written = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert written["domain_check"]["fits"] is None and written["domain_check"]["model"] == str(old)


def test_predict_writes_predict_json_keeps_its_other_content_and_prints_one_warning(model, sets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "predict.json").write_text(json.dumps({"earlier": {"kept": True}}))
    assert cli(["predict", "--model", str(model), "--particles", str(sets["bgal11"]), "--out", str(out),
                "--device", "cpu", "--workers", "0"]) == 0
    stdout = capsys.readouterr().out
    warnings = [line for line in stdout.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "does not fit these particles" in warnings[0], stdout
    written = json.loads((out / "predict.json").read_text())
    check = written["domain_check"]
    assert written["earlier"] == {"kept": True} and check["fits"] is False and check["reasons"]
    assert check["signal_shape_low"] > LIMIT["signal_shape"] and check["thresholds"] == LIMIT
    assert not list(out.glob(".predict.json*"))  # written atomically: no temporary file left


def test_the_relion_and_cryosparc_logs_show_the_warning(model, sets, tmp_path, capsys):
    """The RELION External job (mode predict, as RELION runs it) prints its events to run.out (stdout): one
    WARNING line; the cryoSPARC job's events update one progress line, so the warning must be an event of its own
    (level warning), not overwritten by the next progress line."""
    from relion_external.cryoforum_relion import main as relion_job

    from cryoforum_plugin.adapters.cryosparc import CryosparcEvents

    job = tmp_path / "External" / "job012"
    assert relion_job(["--o", str(job), "--in_parts", str(sets["bgal11"]), "--mode", "predict", "--model", str(model),
                       "--refine", "no", "--reconstruct", "no", "--j", "1"]) == 0
    run_out = capsys.readouterr().out.splitlines()
    warnings = [line for line in run_out if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "does not fit these particles" in warnings[0], run_out
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()

    line = domain.summary_line({"fits": False, "reasons": ["their power spectrum has another shape"]})

    class Job:
        def __init__(self):
            self.events = []

        def log(self, text, level="text", name=None):
            self.events.append((text, level, name))

    job = Job()
    events = CryosparcEvents(job)
    events.message(line)
    events.message("done: 10 confident, 2 rejected")
    assert job.events[0] == (line, "warning", None) and job.events[1][2] == "progress"


def test_training_writes_the_reference_and_the_job_writes_predict_json(tmp_path):
    """``steps.train`` (through the whole job) writes domain.json; the job's outputs hold predict.json, and the
    training set itself fits its own model."""
    from cryoforum_plugin.pipeline import job as pipeline_job
    from cryoforum_plugin.pipeline import options as pipeline_options

    simulate(DEFAULT_MAP, tmp_path / "sim", n=100, seed=3, **{**SIM, "snr": 1.0})
    star = tmp_path / "sim" / "particles.star"
    opts = pipeline_options.options(preset="cpu", epochs=1, box=32, width=0.125, batch=16, grid_spacing=30.0,
                                    pretrain_steps=0, device="cpu", workers=0, refine=False, time_budget=0)
    events = Recorder()
    result = pipeline_job.pipeline(opts, train_set=read_star(star), predict_set=None, model_dir=tmp_path / "m",
                                   events=events)
    ref = ModelDir(tmp_path / "m").domain()
    assert ref is not None and ref["split"] == "val"
    assert ref["particles"] == len(ModelDir(tmp_path / "m").split_uids("val"))
    pipeline_job.write_outputs(result, tmp_path / "out", star, opts, reconstruct_map=False, events=events)
    check = json.loads((tmp_path / "out" / "predict.json").read_text())["domain_check"]
    assert check["fits"] is True and check == json.loads(json.dumps(result.prediction.domain_check))
    assert sum(line.startswith("[cryo-forum] domain check: the model fits") for line in events.lines) == 1
