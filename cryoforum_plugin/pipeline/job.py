"""The whole train-predict job every front end runs (the RELION External job, the cryoSPARC job, ``cryoforum
run`` and the demo): ``pipeline`` chains the steps (``steps``: train, predict, refine, select) with the options
of ``options.options``, ``write_outputs`` writes what it produced under the RELION External job's names.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.particles import ParticleSet
from cryoforum_plugin.infer.predict import Prediction
from cryoforum_plugin.pipeline.steps import (
    MODEL_HALF_MAPS,
    Reference, Selection, predict, reconstruct, refine, select, train, write_predictions, write_refined,
    write_selection,
)
from cryoforum_plugin.progress import Events
from cryoforum_plugin.refine.driver import RefineResult
from cryoforum_plugin.runtime import set_threads
from cryoforum_plugin.train.config import TrainConfig
from cryoforum_plugin.train.model_dir import ModelDir


@dataclasses.dataclass
class PipelineResult:
    """What a train-predict job produced (in memory; the front end writes its own contract's outputs)."""

    model_dir: Path
    predicted: ParticleSet  # every particle, predicted poses and uncertainty
    prediction: Prediction
    selection: Selection  # of ``final``
    training: dict | None  # Trainer summary (with its per-epoch log) when the job trained
    refined: ParticleSet | None = None  # the predicted set refined against the reference
    refinement: RefineResult | None = None
    reference: Reference | None = None

    @property
    def final(self) -> ParticleSet:
        """The poses the job hands back: refined when it refined, else predicted."""
        return self.refined if self.refined is not None else self.predicted


def training_reference(train_set: ParticleSet, model_dir, opts, events: Events) -> Reference:
    """Half-maps reconstructed from the training particles at their (consensus) poses, each from the particles of
    one half-set (``ParticleSet.with_half_sets``, the assignment the refinement matches them with), written beside
    the model (``steps.MODEL_HALF_MAPS``): the default reference, and the FSC weights of a given map (also in
    later predict jobs with this model)."""
    path = Path(model_dir) / "reference.mrc"
    events.message(f"[cryo-forum] reconstructing the reference from {len(train_set)} training particles -> {path}")
    reconstruct(train_set, path, sym=opts.sym, halves=True, device=opts.device, events=events)
    return Reference.from_files(half_maps=[path.with_name(name) for name in MODEL_HALF_MAPS])


def pipeline(opts: argparse.Namespace, *, train_set: ParticleSet | None, predict_set: ParticleSet | None,
             model_dir, reference: Reference | None = None, events: Events | None = None) -> PipelineResult | None:
    """Train on ``train_set`` (if given) into ``model_dir``, predict ``predict_set`` (default: the training set)
    with it, refine the predicted poses against ``reference`` (default: a reconstruction of the training set;
    skipped with ``opts.refine`` false, or without either), and select the confident particles, all with the
    options ``opts`` (see ``options.options``). Every particle gets one half-set first (the input's, else by uid:
    ``ParticleSet.with_half_sets``), used by the training map, the reference's half-maps and the refinement
    (each half matched against its own half-map) and kept in every returned set. Returns None on the non-zero
    ranks of a torchrun job."""
    events = events or Events()
    set_threads(opts.threads)
    model_dir = Path(model_dir)
    summary = None
    # one half-set assignment for every step (training map, reference half-maps, refinement, outputs)
    if train_set is not None:
        train_set = train_set.with_half_sets()
    if predict_set is not None:
        predict_set = predict_set.with_half_sets(like=train_set)
    if opts.refine:  # refinement (and its default reference) work on one grid: say so before hours of training
        for part in (train_set, predict_set):
            if part is not None:
                part.require_one_sampling("refinement")
    if train_set is not None:
        events.message(f"[cryo-forum] training on {len(train_set)} particles -> {model_dir}")
        config = TrainConfig.from_args(opts)
        if config.from_map is None and reference is not None and reference.path is not None:
            config.from_map = reference.path  # pre-train on projections of the consensus map the job was given
        summary = train(train_set, model_dir, config, device=opts.device,
                        resume=bool(opts.resume) and ModelDir(model_dir).has_checkpoint, workers=opts.workers,
                        cache_gb=opts.cache_gb, events=events, compile=opts.compile)
    target = predict_set if predict_set is not None else train_set
    if target is None:
        raise CryoforumError("nothing to predict.", fix="give the particles to predict.")
    events.message(f"[cryo-forum] predicting {len(target)} particles with {model_dir}")
    # every rank predicts its block (under torchrun); rank 0 gets the merged set, the others None
    predicted, pred = predict(target, model_dir, device=opts.device, tta=opts.tta, workers=opts.workers,
                              events=events, precision=opts.precision, compile=opts.compile,  # None: the model's
                              rewhiten=opts.rewhiten)
    if predicted is None:
        return None
    events.check_abort()
    result = PipelineResult(model_dir, predicted, pred, None, summary)
    if opts.refine:
        if train_set is not None:  # the training particles' half-maps: the reference, or the given map's weights
            halves = training_reference(train_set, model_dir, opts, events)
            reference = halves if reference is None else reference.weighted_by(halves)
        elif reference is not None:
            reference = reference.with_model_half_maps(model_dir)
        if reference is None:
            events.message("[cryo-forum] no reference map (give one, or train in this job): poses not refined")
        else:
            events.message(f"[cryo-forum] refining {len(predicted)} particles against {reference.source}")
            result.refined, result.refinement = refine(
                predicted, reference, sym=opts.sym, global_search=opts.global_search, trust=opts.trust,
                search_radius=opts.search_radius, max_shift=opts.max_shift, resolution=opts.resolution,
                device=opts.device, events=events)
            result.reference = reference
    result.selection = select(result.final, statistic=opts.statistic, drop=opts.drop, threshold=opts.threshold,
                              target_error=opts.target_error, model_dir=model_dir)
    events.message(f"[cryo-forum] kept {result.selection.kept} / {len(predicted)} particles "
                   f"({result.selection.summary['mode']}, {result.selection.summary['statistic']})")
    if events.wants_figures:
        _figures(result, events)
    return result


def _figures(result: PipelineResult, events: Events) -> None:
    """The job's figures for front ends that show them (the cryoSPARC event log)."""
    from cryoforum_plugin.pipeline.plots import histogram, pyplot, training_curve

    figs = []
    if result.training and result.training.get("log"):
        figs.append((training_curve(result.training["log"]), "cryo-forum training curve"))
    figs.append((histogram(result.prediction.dispersion["trace"], "trace dispersion (eq. 7; near 0 = uncertain)"),
                 "cryo-forum uncertainty"))
    if result.refinement is not None:
        figs.append((histogram(result.refinement.confidence, "refinement confidence (1 = certain)"),
                     "cryo-forum refinement confidence"))
    for fig, title in figs:
        events.figure(fig, title)
        pyplot().close(fig)


def write_outputs(result: PipelineResult, out_dir, input_path, opts: argparse.Namespace, *, fmt: str = "star",
                  reconstruct_map: bool = True, project_dir=None,
                  events: Events | None = None) -> list[tuple[str, str]]:
    """Every output of a train-predict job, with the names of the RELION External job: predicted.*,
    refined.* (+ refine.json) when it refined, confident.* / rejected.* (+ filter.json), and with
    ``reconstruct_map`` confident_map.mrc and its half-maps. Returns the output nodes as (path, kind), kind one of
    'model', 'particles', 'map'. Used by the RELION adapter, ``cryoforum run`` and the demo."""
    events = events or Events()
    out = Path(out_dir)
    nodes: list[tuple[str, str]] = []
    if result.training is not None:
        nodes.append((str(ModelDir(result.model_dir).best_path), "model"))
    written = write_predictions(result.predicted, out, input_path, fmt, project_dir=project_dir,
                                domain_check=result.prediction.domain_check,
                                rewhitening=result.prediction.rewhitening)
    nodes += [(str(p), "particles") for p in written if not p.stem.endswith("_uncertainty")]
    if result.refined is not None:
        written = write_refined(result.refined, result.refinement, out, input_path, fmt, project_dir=project_dir,
                                extra={"reference": result.reference.source})
        nodes += [(str(p), "particles") for p in written]
    written = write_selection(result.final, result.selection, out, input_path, fmt, project_dir=project_dir)
    nodes += [(p, "particles") for p in written]
    if reconstruct_map:
        events.check_abort()
        events.message(f"[cryo-forum] reconstructing the {result.selection.kept} confident particles")
        reconstruct(result.final.subset(result.selection.keep), out / "confident_map.mrc", sym=opts.sym,
                    halves=True, device=opts.device, events=events)
        nodes.append((str(out / "confident_map.mrc"), "map"))
    return nodes
