"""The typed steps of a job, each one thing on a ParticleSet: ``train``, ``predict``, ``select`` (quantile /
threshold / calibrated target error), ``reconstruct``, ``refine`` (against a ``Reference``), and the writers of
their outputs (``write_predictions``, ``write_selection``, ``write_refined``). Every front end calls them: the
CLI commands one each, ``job.pipeline`` chained into a train-predict job (the RELION External job, the cryoSPARC
job, ``cryoforum run`` and the demo).

Layers (docs/architecture.md): front ends (``commands/``, ``adapters/``, ``relion_external/``) translate their
contract into these typed steps and the results back; the steps decide; the engine (training, prediction,
refinement, reconstruction, clean-up) computes on ParticleSets; the core below it does I/O and physics.
Every step reports through one ``progress.Events`` (progress lines, messages, figures, abort).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.atomic import atomic_path, write_text
from cryoforum_plugin.formats.columns import REFINE_CS, REFINE_STAR
from cryoforum_plugin.formats.cs import uncertainty_dataset
from cryoforum_plugin.formats.files import output_paths, write_particles
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.infer.metrics import geodesic_errors
from cryoforum_plugin.infer.predict import Prediction, with_predictions
from cryoforum_plugin.infer.select import (
    calibrate_threshold, keep_by_quantile, read_uncertainty, resolve_statistic, uncertainty_score,
)
from cryoforum_plugin.progress import Events
from cryoforum_plugin.refine.driver import RefineResult
from cryoforum_plugin.runtime import resolve_device
from cryoforum_plugin.train.config import TrainConfig
from cryoforum_plugin.train.model_dir import ModelDir


# ---------------------------------------------------------------------------------------------- train / predict


def train(ps: ParticleSet, model_dir, config: TrainConfig, *, device="auto", resume: bool = False,
          workers: int = -1, cache_gb: float = 2.0, events: Events | None = None, compile: bool = False) -> dict:
    """Train on ``ps`` (poses required) into ``model_dir``; ``resume`` continues from its last.pt; ``compile``:
    --compile (runtime.compiled).
    Returns {'best_val_median_rad', 'epochs', 'log', 'rank'}."""
    from cryoforum_plugin.train.trainer import Trainer

    events = events or Events()
    ps.validate_images()
    trainer = Trainer(ps, model_dir, config, resolve_device(device), events=events, workers=workers,
                      cache_gb=cache_gb, compile=compile)
    if resume and trainer.resume():
        events.message(f"resumed from {ModelDir(model_dir).last_path} at epoch {trainer.epoch}")
    summary = trainer.train()
    summary["rank"] = trainer.rank
    if trainer.rank == 0:
        events.message(f"best validation median error {summary['best_val_median_rad']:.4f} rad "
                       f"({np.degrees(summary['best_val_median_rad']):.2f}°) -> {ModelDir(model_dir).best_path}")
    write_domain_reference(ps, model_dir, device=device, events=events)
    return summary


def write_domain_reference(ps: ParticleSet, model_dir, *, device="auto", events: Events | None = None) -> None:
    """domain.json in ``model_dir``: the statistics of the trained model's validation particles (rows of ``ps``,
    the training set) that ``domain_check`` compares new particles with (``infer.domain.domain_reference``).
    Every torchrun rank calls it (the prediction is shared); rank 0 writes."""
    from cryoforum_plugin.infer.domain import domain_reference

    reference = domain_reference(ps, model_dir, device=resolve_device(device))
    if reference is not None:
        model = ModelDir(model_dir)
        model.write_domain(reference)
        (events or Events()).message(f"[cryo-forum] domain check reference: {reference['particles']} "
                                     f"{reference['split']} particles -> {model.domain_path}")


def domain_check(ps: ParticleSet, pred: Prediction, model_dir, *, device="auto",
                 events: Events | None = None) -> dict:
    """Whether the model in ``model_dir`` fits the predicted particles ``ps`` (``pred`` their prediction): their
    statistics against the model's domain.json (``infer.domain.check_domain``; a model without one: fits None,
    cannot judge), with 'model' added. One line through ``events``, starting 'WARNING:' when it does not fit."""
    from cryoforum_plugin.infer.domain import check_domain, particle_statistics, summary_line

    model = ModelDir(model_dir)
    reference = model.domain()
    stats = (particle_statistics(ps, pred.fom, pred.evals is not None, model, device=resolve_device(device))
             if reference is not None else {"particles": len(ps)})
    check = {**check_domain(reference, stats), "model": str(model.path)}
    (events or Events()).message(summary_line(check))
    return check


def write_predict_json(out_dir, fields: dict) -> Path:
    """predict.json in ``out_dir`` (atomic): ``fields`` (JSON-able) merged into the object it already holds."""
    path = Path(out_dir) / "predict.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    write_text(path, json.dumps({**(old if isinstance(old, dict) else {}), **fields}, indent=2))
    return path


def predict(ps: ParticleSet, model_dir, *, device="auto", batch: int = 512, tta: int = 1, workers: int = -1,
            events: Events | None = None,
            precision: str | None = None,
            compile: bool = False, rewhiten: bool = False) -> tuple[ParticleSet, Prediction] | tuple[None, None]:
    """Predicted poses and uncertainty for every particle: (the set with predicted poses and the uncertainty
    columns, the raw Prediction, whose ``domain_check`` says whether the model fits them: ``domain_check``).
    ``precision``: --precision (None: the model's); ``compile``: --compile; ``rewhiten``: --rewhiten (each optics
    group whitened by its own noise spectrum, ``Prediction.rewhitening``). Under torchrun the non-zero ranks
    return (None, None)."""
    from cryoforum_plugin.infer.predict import predict as run_prediction

    ps.validate_images()
    pred = run_prediction(ps, model_dir, device=resolve_device(device), batch=batch, tta=tta, events=events,
                          workers=workers, precision=precision, compile=compile, rewhiten=rewhiten)
    if pred is None:
        return None, None
    pred.domain_check = domain_check(ps, pred, model_dir, device=device, events=events)
    return with_predictions(ps, pred), pred


def write_predictions(ps: ParticleSet, out_dir, input_path, fmt: str = "auto", stem: str = "predicted",
                      project_dir=None, domain_check: dict | None = None,
                      rewhitening: dict | None = None) -> list[Path]:
    """Write a predicted set as STAR and/or .cs (+ the uid-keyed uncertainty sidecar beside a .cs), and with
    ``domain_check`` (``Prediction.domain_check``) and/or ``rewhitening`` (``Prediction.rewhitening``, --rewhiten)
    predict.json beside them (``write_predict_json``)."""
    written = []
    for path in output_paths(input_path, out_dir, stem, fmt):
        write_particles(ps, path, relative_to=Path(out_dir).resolve(), project_dir=project_dir)
        written.append(path)
        if path.suffix == ".cs":
            side = path.with_name(f"{stem}_uncertainty.cs")
            with atomic_path(side) as tmp:
                uncertainty_dataset(ps).save(str(tmp))
            written.append(side)
    record = {k: v for k, v in (("domain_check", domain_check), ("rewhitening", rewhitening)) if v is not None}
    if record:
        write_predict_json(out_dir, record)
    return written


# ---------------------------------------------------------------------------------------------- select


@dataclasses.dataclass
class Selection:
    """Which particles to keep: ``keep`` (N,) bool, and how it was chosen (``summary``, JSON-able)."""

    keep: np.ndarray
    summary: dict

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    @property
    def rejected(self) -> int:
        return int((~self.keep).sum())


def _validation_errors(ps: ParticleSet, model: ModelDir) -> tuple[np.ndarray, np.ndarray]:
    """(rows, errors in radians) of the model's validation particles: their poses in ``ps`` (what the job hands
    back: refined, or predicted when not refined) against the input's poses (``prior_quat``, e.g. the consensus
    refinement the model was trained on), never against the network's prediction (``predicted_quat``)."""
    rows = np.nonzero(np.isin(ps.uid, model.split_uids("val")))[0]
    prior = ps.prior_quat
    if prior is not None:
        rows = rows[np.isfinite(prior[rows]).all(axis=1)]
    if prior is None or len(rows) < 10:
        raise CryoforumError("--target-error needs the model's validation particles with their input poses.",
                             path=ps.path, fix="predict the particles the model was trained on, "
                                               "or use --drop / --threshold.")
    return rows, geodesic_errors(ps.quat[rows], prior[rows], model.config().sym)


def select(ps: ParticleSet, *, statistic: str = "auto", drop: float = 0.25, threshold: float | None = None,
           target_error: float | None = None, model_dir=None, uncertainty=None) -> Selection:
    """Keep the confident particles of a predicted (or refined) set: by ``target_error`` (degrees; the threshold
    on the statistic at which the kept validation particles of the model have a median error of the set's poses
    against the input's poses at most ``target_error``, see ``_validation_errors``), else by ``threshold`` on the
    statistic, else dropping the ``drop`` fraction with the highest uncertainty. ``statistic`` auto:
    ``resolve_statistic``'s choice (the summary names the one used). ``uncertainty``: the sidecar of a .cs
    prediction (default: beside it)."""
    unc = read_uncertainty(ps, uncertainty)
    statistic = resolve_statistic(unc, statistic, threshold)
    score = uncertainty_score(unc, statistic)
    summary = {"statistic": statistic}
    if target_error is not None:
        if not model_dir:
            raise CryoforumError("--target-error needs --model.", fix="add --model MODEL_DIR.")
        rows, err = _validation_errors(ps, ModelDir(model_dir))
        t = calibrate_threshold(score[rows], err, np.radians(target_error))
        if t is None:
            raise CryoforumError(f"no threshold keeps the validation median error below {target_error}°.",
                                 fix="raise --target-error or train a better model.")
        keep = score <= t
        summary.update(mode="target_error", target_error_deg=target_error, threshold=t,
                       validation_particles=int(len(rows)), calibrated_on="these poses vs the input's poses")
    elif threshold is not None:
        keep = score <= threshold
        summary.update(mode="threshold", threshold=threshold)
    else:
        keep = keep_by_quantile(score, drop)
        summary.update(mode="quantile", drop=drop)
    summary.update(particles=len(ps), kept=int(keep.sum()), rejected=int((~keep).sum()))
    return Selection(keep, summary)


def write_selection(ps: ParticleSet, selection: Selection, out_dir, input_path, fmt: str = "auto",
                    project_dir=None) -> list[str]:
    """confident.* and rejected.* (subsets of ``ps``, every original column kept) and filter.json."""
    out = Path(out_dir)
    written = []
    for name, mask in (("confident", selection.keep), ("rejected", ~selection.keep)):
        for path in output_paths(input_path, out, name, fmt):
            write_particles(ps.subset(mask), path, relative_to=out.resolve(), project_dir=project_dir)
            written.append(str(path))
    write_text(out / "filter.json", json.dumps({**selection.summary, "input": str(input_path), "outputs": written},
                                              indent=2))
    return written


# ---------------------------------------------------------------------------------------------- reconstruct


def reconstruct(ps: ParticleSet, out_map, *, sym: str = "C1", halves: bool = False, weights=None,
                ctf: bool = True, batch: int = 256, device="auto", events: Events | None = None) -> dict:
    """Reconstruct ``ps`` at its poses into ``out_map`` (+ NAME_half1/2.mrc with ``halves``); returns
    {'map', 'pixel_size_A', 'box', 'particles', and 'half_map_fsc_0.143_A' with halves}."""
    from cryoforum_plugin.physics.fsc import fsc_curve, resolution
    from cryoforum_plugin.formats.mrc import write_mrc
    from cryoforum_plugin.physics.reconstruct import reconstruct as run_reconstruction

    ps.validate_images()
    if not ctf:
        ps = dataclasses.replace(ps, ctf=None)
    maps = run_reconstruction(ps, sym=sym, weights=weights, halves=halves, batch=batch,
                              device=resolve_device(device), events=events)
    out = Path(out_map)
    apix, box = float(ps.pixel_size[0]), int(ps.box[0])
    write_mrc(out, maps["full"], apix)
    result = {"map": str(out), "pixel_size_A": apix, "box": box, "particles": len(ps)}
    if halves:
        for h in ("half1", "half2"):
            write_mrc(out.with_name(f"{out.stem}_{h}.mrc"), maps[h], apix)
        result["half_map_fsc_0.143_A"] = resolution(fsc_curve(maps["half1"], maps["half2"]), box, apix, 0.143)
    return result


# ---------------------------------------------------------------------------------------------- refine


MODEL_HALF_MAPS = ("reference_half1.mrc", "reference_half2.mrc")  # in a model directory: its training half-maps


@dataclasses.dataclass
class Reference:
    """A reference for the refinement and its pixel size (Å): one map, two half-maps (gold standard), or one map
    with half-maps whose FSC weights it ({'map', 'half1', 'half2'}, ``refine.reference.prepare_reference``)."""

    maps: np.ndarray | dict
    pixel_size: float
    source: str  # where it came from, for the log and refine.json
    path: str | None = None  # the map file of a one-map reference (training from the map uses it)

    @classmethod
    def from_files(cls, reference=None, half_maps=None) -> "Reference":
        """From --reference MAP and/or --half-maps H1 H2 (both: the map, FSC-weighted by the half-maps)."""
        from cryoforum_plugin.formats.mrc import read_map

        if half_maps:
            (h1, apix), (h2, apix2) = read_map(half_maps[0]), read_map(half_maps[1])
            if h1.shape != h2.shape or abs(apix - apix2) > 1e-3 * apix:
                raise CryoforumError(f"the half-maps differ in box or pixel size ({h1.shape[0]} px at {apix:.3f} Å, "
                                     f"{h2.shape[0]} px at {apix2:.3f} Å).", path=half_maps[1],
                                     fix="pass the two half-maps of one refinement.")
            halves = cls({"half1": h1, "half2": h2}, apix, f"half-maps {half_maps[0]}, {half_maps[1]}")
            return cls.from_files(reference).weighted_by(halves) if reference else halves
        if reference:
            vol, apix = read_map(reference)
            return cls(vol, apix, str(reference), str(Path(reference).resolve()))
        raise CryoforumError("no reference map.", fix="pass --reference MAP or --half-maps HALF1 HALF2.")

    @property
    def one_map(self) -> bool:
        """One map without half-maps (neither gold standard nor already weighted)."""
        return not isinstance(self.maps, dict)

    def weighted_by(self, halves: "Reference") -> "Reference":
        """This one map, filtered in the refinement by the FSC of ``halves`` (brought onto this map's grid): a
        consensus map refined against to Nyquist unfiltered aligns the particles' noise to its own. A reference
        with half-maps of its own (gold standard, or already weighted) is returned as it is."""
        from cryoforum_plugin.physics.resample import map_on_particle_grid

        if not self.one_map:
            return self
        d = self.maps.shape[-1]
        on_grid = {k: map_on_particle_grid(halves.maps[k], d, self.pixel_size, halves.pixel_size, "cpu",
                                           what="half-map").numpy() for k in ("half1", "half2")}
        return Reference({"map": self.maps, **on_grid}, self.pixel_size,
                         f"{self.source}, FSC-weighted by {halves.source}", self.path)

    def with_model_half_maps(self, model_dir) -> "Reference":
        """A one-map reference weighted by the half-maps of the model's training particles where the model
        directory has them (``MODEL_HALF_MAPS``, written by a job that trained); otherwise itself."""
        files = [Path(model_dir) / name for name in MODEL_HALF_MAPS]
        if not self.one_map or not all(f.exists() for f in files):
            return self
        return self.weighted_by(Reference.from_files(half_maps=files))


def refine(ps: ParticleSet, reference: Reference, *, sym: str = "C1", global_search: str = "auto",
           trust: float = 0.5, search_radius: float | None = None, max_shift: float | None = None,
           resolution: float | None = None, batch: int = 128, device="auto",
           events: Events | None = None) -> tuple[ParticleSet, RefineResult]:
    """Refined poses and shifts of ``ps`` against ``reference`` (refinement.refine), the score and confidence in
    the refine columns. The input's poses stay in ``prior_quat`` (a set without them, e.g. a consensus STAR
    refined directly: its starting poses become ``prior_quat``), the network's in ``predicted_quat`` (a
    prediction from an older version without those columns: its starting poses). Particles are matched against
    the half-map of their own half-set (``ps.with_half_sets()``, written back). ``global_search`` auto: particles
    without a pose, or whose figure of merit (the network's confidence) is below ``trust``."""
    from cryoforum_plugin.refine.driver import refine as run_refinement

    ps.validate_images()
    ps = ps.with_half_sets()
    uncertain = (ps.fom < trust) if (ps.fom is not None and global_search == "auto") else None
    radius = None if search_radius is None else np.full(len(ps), float(search_radius))
    result = run_refinement(ps, reference.maps, reference_pixel_size=reference.pixel_size, sym=sym,
                            max_shift_A=max_shift, global_search=global_search, uncertain=uncertain,
                            start_error_deg=radius, resolution_A=resolution, batch=batch,
                            device=resolve_device(device), events=events)
    numeric = dict(ps.numeric)
    for key, values in (("score", result.score), ("confidence", result.confidence), ("cc_low", result.cc_low),
                        ("sector", result.sector)):
        numeric[REFINE_STAR[key]] = values
        numeric[REFINE_CS[key]] = values
    start = ps.quat.copy() if ps.has_poses.any() else None
    prior = ps.prior_quat if ps.prior_quat is not None else start
    predicted = ps.predicted_quat
    if predicted is None and ps.uncertainty is not None:  # a prediction written before predicted_quat existed
        predicted = start
    refined = dataclasses.replace(ps, quat=result.quat.copy(), shift_A=result.shift_A.copy(), prior_quat=prior,
                                  predicted_quat=predicted, numeric=numeric)
    return refined, result


def write_refined(ps: ParticleSet, result, out_dir, input_path, fmt: str = "auto", project_dir=None,
                  extra: dict | None = None) -> list[Path]:
    """refined.star and/or refined.cs, and refine.json (what was done, how fast, score and confidence)."""
    out = Path(out_dir)
    written = []
    for path in output_paths(input_path, out, "refined", fmt):
        write_particles(ps, path, relative_to=out.resolve(), project_dir=project_dir)
        written.append(path)
    summary = {"particles": len(ps), "global_searched": int(result.global_searched.sum()),
               "seconds": round(result.seconds, 2), "particles_per_second": round(result.particles_per_second, 2),
               "median_score": float(np.median(result.score)) if len(ps) else None,
               "median_confidence": float(np.median(result.confidence)) if len(ps) else None,
               "outputs": [str(p) for p in written], **(extra or {})}
    write_text(out / "refine.json", json.dumps(summary, indent=2))
    return written
