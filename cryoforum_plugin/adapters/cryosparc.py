"""cryoSPARC External job adapter (cryosparc-tools 5.0): cryoSPARC's job contract in, ``pipeline`` calls, contract out.

Outputs of the External job: ``predicted`` (every particle, alignments3D pose/shift filled, passthrough of the
input's slots), ``refined`` (when it refined: the poses and shifts refined against the ``--reference`` volume, or against
half-maps reconstructed from the training particles), ``confident`` and ``rejected`` (selections of the ORIGINAL
particles with the final poses: same uids, passthrough of blob, ctf, location...). The per-particle uncertainty is uploaded as ``cryoforum_uncertainty.cs`` (uid-keyed:
cryoforum/max_dispersion, cryoforum/trace_dispersion, cryoforum/fom) into the job directory, the domain check
(whether the model fits these particles; a warning event when it does not) as ``predict.json``; the trained model
goes to ``<job dir>/model``. Progress is one updating line of the event log; figures go to the log. Outputs are
saved only after everything was computed and uploaded: a failed job has none.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np

from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin.pipeline import steps
from cryoforum_plugin.pipeline import job as pipeline_job
from cryoforum_plugin.errors import CryoforumError
from cryoforum_plugin.formats.cs import from_dataset, to_dataset, uncertainty_dataset
from cryoforum_plugin.progress import Events

TRAIN_SLOTS = ["blob", "ctf", "alignments3D"]
PREDICT_SLOTS = ["blob", "ctf"]
REFERENCE_SLOTS = ["map"]
OUTPUTS = ("predicted", "confident", "rejected")


def _source(spec: str, flag: str) -> tuple[str, str]:
    if not spec or ":" not in spec:
        raise CryoforumError(f"{flag} '{spec}' is not JOB:OUTPUT.", fix=f"pass e.g. {flag} J12:particles.")
    job, output = spec.split(":", 1)
    return job, output


def reason(exc: BaseException) -> str:
    """The server's whole reason for a refusal on one line (status code and its detail), or the error's text."""
    data = getattr(exc, "data", None)
    code = getattr(exc, "code", None)
    if data is not None:
        detail = data.get("detail", data) if isinstance(data, dict) else data
        text = detail if isinstance(detail, str) else json.dumps(detail)
        return f"HTTP {code}: {text}" if code else text
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def connect(url: str | None):
    """A cryosparc-tools client from --url or the usual environment variables and saved login."""
    from cryosparc.tools import CryoSPARC

    kwargs = {}
    if url:
        kwargs["base_url"] = url
    elif os.getenv("CRYOSPARC_BASE_URL"):
        kwargs["base_url"] = os.environ["CRYOSPARC_BASE_URL"]
    else:
        kwargs["host"] = os.getenv("CRYOSPARC_MASTER_HOSTNAME", "localhost")
        kwargs["base_port"] = int(os.getenv("CRYOSPARC_BASE_PORT", "39000"))
    try:
        return CryoSPARC(**kwargs)
    except Exception as exc:
        raise CryoforumError(f"cannot connect to CryoSPARC ({reason(exc)}).",
                             fix="check --url / CRYOSPARC_BASE_URL and CRYOSPARC_EMAIL / CRYOSPARC_PASSWORD, "
                                 "or run `python -m cryosparc.tools login`.") from None


class CryosparcEvents(Events):
    """The job's event log: one progress line updated in place (rate-limited), figures as image events."""

    wants_figures = True

    def __init__(self, job, every: float = 10.0):
        super().__init__()
        self.job, self.every, self.last = job, every, 0.0

    @property
    def interactive(self) -> bool:
        return False

    def progress(self, text: str, final: bool = False) -> None:
        if final or time.time() - self.last >= self.every:
            self.job.log(text, name="progress")
            self.last = time.time()

    def message(self, text: str) -> None:
        """A line of the updating progress event; a line starting 'WARNING:' (the domain check's) is an event of
        its own at level warning, so the next progress line does not overwrite it."""
        if text.startswith("WARNING:"):
            self.job.log(text, level="warning")
        else:
            self.progress(text, final=True)

    def figure(self, fig, title: str) -> None:
        self.job.log_plot(fig, title, formats=["png"])


def _check_build(job) -> None:
    """One clear line for an input the server refused to accept (build errors recorded on the job)."""
    job.refresh()
    errors = list(getattr(job.model, "build_errors", None) or [])
    if not errors:
        return
    e = errors[0]
    loc = "/".join(str(x) for x in (e.loc if hasattr(e, "loc") else e.get("loc", [])))
    kind = e.type if hasattr(e, "type") else e.get("type", "")
    slot = str((e.loc if hasattr(e, "loc") else e.get("loc", ["?"]))[-1])
    if "train" in loc and slot == "alignments3D":
        raise CryoforumError("the training particles have no alignments3D (poses).",
                             fix="connect the particles output of a refinement (e.g. Homogeneous Refinement).")
    raise CryoforumError(f"CryoSPARC refused the job's inputs: {kind} at {loc}.",
                         fix="connect a particles output that has the slot named there.")


def run(args) -> dict:
    """Create the External job and do the work; returns a summary. On any error the job is marked failed with a
    one-line message and a CryoforumError is raised; outputs are saved only after everything else succeeded."""
    if not args.train and not args.model:
        raise CryoforumError("nothing to do: give --train JOB:OUTPUT, or --model for predict-only.",
                             fix="e.g. --train J12:particles.")
    train_src = _source(args.train, "--train") if args.train else None
    predict_src = _source(args.predict, "--predict") if (args.predict or not args.train) else None
    cs = connect(args.url)
    job = None
    try:
        project = cs.find_project(args.project)
        mode = "train + predict" if args.train else "predict"
        job = project.create_external_job(args.workspace, title=f"cryo-forum ({mode})")
        target = "predict_particles" if predict_src else "train_particles"
        reference_src = _source(args.reference, "--reference") if (args.reference and args.refine) else None
        for name, src, slots in (("train_particles", train_src, TRAIN_SLOTS),
                                 ("predict_particles", predict_src, PREDICT_SLOTS),
                                 ("reference", reference_src, REFERENCE_SLOTS)):
            if src:
                try:
                    job.connect(name, *src, slots=slots)
                except Exception as exc:
                    raise CryoforumError(f"cannot connect {src[0]}:{src[1]} to {name} ({reason(exc)}).",
                                         fix="connect a particles output that has " + ", ".join(slots)
                                             + " (training needs a refinement's particles with alignments3D).") from None
        _check_build(job)
        for name in OUTPUTS + (("refined",) if args.refine and (args.train or reference_src) else ()):
            job.add_output("particle", name=name, slots=["alignments3D"], passthrough=target)
        job.start("running")
        summary = _work(job, project, args, target)
        job.stop()
    except BaseException as exc:
        err = exc if isinstance(exc, CryoforumError) else CryoforumError(
            f"CryoSPARC request failed: {reason(exc)}.",
            fix="check the CryoSPARC server and the job's inputs, then re-run; the job was marked failed without "
                "outputs.")
        if job is not None:
            try:
                job.stop(error=f"cryo-forum: {err}")
            except Exception:  # the server itself may be gone; the CLI still reports the first error
                pass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise err from None
    summary["job"] = job.uid
    return summary


def _alignments(out, ps):
    """``out`` (an allocated output Dataset of the same rows as ``ps``) with alignments3D from ``ps``."""
    full = to_dataset(ps)
    for field in out.fields():
        if field.startswith("alignments3D/") and field in full.fields():
            out[field] = full[field]
    return out


def _reference(job, project_dir: str) -> steps.Reference:
    """The connected volume: its half-maps when the output has them (gold standard), else its map."""
    ds = job.load_input("reference")
    fields = set(ds.fields())

    def path(slot):
        value = ds[f"{slot}/path"][0]
        value = value.decode() if isinstance(value, bytes) else str(value)
        return str(Path(project_dir) / value.lstrip(">"))

    if {"map_half_A/path", "map_half_B/path"} <= fields:
        return steps.Reference.from_files(half_maps=[path("map_half_A"), path("map_half_B")])
    return steps.Reference.from_files(path("map"))


def job_options(args):
    """The pipeline options (``pipeline_options.options``) of a parsed ``cryoforum cryosparc`` command line: the
    options the user gave, None for training options not given (``--preset`` fills them)."""
    return pipeline_options.options_from(args)


def _work(job, project, args, target) -> dict:
    events = CryosparcEvents(job)
    project_dir = str(project.dir)
    job_dir = Path(project_dir) / job.uid
    opts = job_options(args)
    train_set = None
    if args.train:
        ds = job.load_input("train_particles")
        if "alignments3D/pose" not in ds.fields():
            raise CryoforumError("the training particles have no alignments3D (poses).",
                                 fix="connect the particles output of a refinement (e.g. Homogeneous Refinement).")
        train_set = from_dataset(ds, project_dir=project_dir)
    pred_ds = job.load_input(target)
    predict_set = from_dataset(pred_ds, project_dir=project_dir)
    model_dir = Path(args.model) if args.model else job_dir / "model"
    opts.refine = bool(args.refine)
    reference = _reference(job, project_dir) if (args.reference and args.refine) else None
    result = pipeline_job.pipeline(opts, train_set=train_set, predict_set=predict_set, model_dir=model_dir,
                                   reference=reference, events=events)
    ps, keep = result.final, result.selection.keep
    # everything is computed, then uploaded, then saved: a failure before the saves leaves the job without outputs
    outputs = {"predicted": _alignments(job.alloc_output("predicted", pred_ds), result.predicted)}
    if result.refined is not None:
        outputs["refined"] = _alignments(job.alloc_output("refined", pred_ds), result.refined)
    for name, mask in (("confident", keep), ("rejected", ~keep)):
        rows = np.nonzero(mask)[0]
        outputs[name] = _alignments(job.alloc_output(name, pred_ds.take(rows)), ps.subset(rows))
    side = io.BytesIO()
    uncertainty_dataset(ps).save(side)
    job.upload("cryoforum_uncertainty.cs", side.getvalue())
    record = {"domain_check": result.prediction.domain_check}
    if result.prediction.rewhitening is not None:
        record["rewhitening"] = result.prediction.rewhitening
    job.upload("predict.json", json.dumps(record, indent=2).encode())
    for name, dataset in outputs.items():
        job.save_output(name, dataset)
    events.message(f"done: {result.selection.kept} confident, {result.selection.rejected} rejected; "
                   f"{result.prediction.particles_per_second:.0f} particles/s")
    return {"particles": len(ps), "confident": result.selection.kept, "rejected": result.selection.rejected,
            "model": str(model_dir), "refined": result.refined is not None}
