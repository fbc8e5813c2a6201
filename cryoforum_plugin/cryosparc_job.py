"""cryoSPARC External job adapter (cryosparc-tools 5.0): translates cryoSPARC's job contract to the engine and back.

Outputs of the External job: ``predicted`` (every particle, alignments3D pose/shift filled, passthrough of the
input's slots), ``confident`` and ``rejected`` (selections of the ORIGINAL particles: same uids, passthrough of
blob, ctf, location...). The per-particle uncertainty is uploaded as ``cryoforum_uncertainty.cs`` (uid-keyed:
cryoforum/max_dispersion, cryoforum/trace_dispersion, cryoforum/fom) into the job directory; the trained model
goes to ``<job dir>/model``. Progress is one updating line of the event log; plots go to the log.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np

from . import geometry
from .cleanup import keep_by_quantile, uncertainty_score
from .errors import CryoforumError
from .particles import from_dataset
from .prediction import predict, uncertainty_dataset, with_predictions
from .training import Trainer, TrainConfig

TRAIN_SLOTS = ["blob", "ctf", "alignments3D"]
PREDICT_SLOTS = ["blob", "ctf"]


def _source(spec: str, flag: str) -> tuple[str, str]:
    if not spec or ":" not in spec:
        raise CryoforumError(f"{flag} '{spec}' is not JOB:OUTPUT.", fix=f"pass e.g. {flag} J12:particles.")
    job, output = spec.split(":", 1)
    return job, output


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
        raise CryoforumError(f"cannot connect to CryoSPARC ({str(exc).splitlines()[0]}).",
                             fix="check --url / CRYOSPARC_BASE_URL and CRYOSPARC_EMAIL / CRYOSPARC_PASSWORD, "
                                 "or run `python -m cryosparc.tools login`.") from None


class _EventProgress:
    """Rate-limited progress line in the job's event log (one event, updated in place)."""

    def __init__(self, job, every: float = 10.0):
        self.job, self.every, self.last = job, every, 0.0

    def __call__(self, text: str, force: bool = False):
        if force or time.time() - self.last >= self.every:
            self.job.log(text, name="progress")
            self.last = time.time()


def _fill_alignments(out, ps, rows=None):
    rows = np.arange(len(ps)) if rows is None else rows
    out["alignments3D/pose"] = geometry.quat_to_cryosparc_pose(ps.quat[rows])
    out["alignments3D/shift"] = ps.shift_A[rows] / ps.pixel_size[rows, None]
    out["alignments3D/psize_A"] = ps.pixel_size[rows]
    if "alignments3D/split" in out.fields():
        out["alignments3D/split"] = np.clip(ps.half_set[rows] - 1, 0, 1)
    return out


def _plot_log(job, trainer_log, unc):
    from .plots import pyplot

    plt = pyplot()
    if trainer_log:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([r["epoch"] for r in trainer_log], [r["val_median_deg"] for r in trainer_log], label="validation")
        ax.plot([r["epoch"] for r in trainer_log], np.degrees([r["train_median_rad"] for r in trainer_log]), label="train")
        ax.set_xlabel("epoch")
        ax.set_ylabel("median error (°)")
        ax.legend()
        job.log_plot(fig, "cryo-forum training curve", formats=["png"])
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(unc, bins=50)
    ax.set_xlabel("trace dispersion (eq. 7; near 0 = uncertain)")
    job.log_plot(fig, "cryo-forum uncertainty", formats=["png"])
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Create the External job and do the work; returns a summary. On any error the job is marked failed with a
    one-line message and a CryoforumError is raised; outputs are saved only after everything was computed."""
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
        for name, src, slots in (("train_particles", train_src, TRAIN_SLOTS),
                                 ("predict_particles", predict_src, PREDICT_SLOTS)):
            if src:
                try:
                    job.connect(name, *src, slots=slots)
                except Exception as exc:
                    raise CryoforumError(f"cannot connect {src[0]}:{src[1]} to {name} ({_first_line(exc)}).",
                                         fix="connect a particles output that has " + ", ".join(slots)
                                             + " (training needs a refinement's particles with alignments3D).") from None
        for name in ("predicted", "confident", "rejected"):
            job.add_output("particle", name=name, slots=["alignments3D"], passthrough=target)
        job.start("running")
        summary = _work(job, project, args, target)
        job.stop()
    except BaseException as exc:
        err = exc if isinstance(exc, CryoforumError) else CryoforumError(
            f"CryoSPARC request failed: {_first_line(exc)}.",
            fix="check that the CryoSPARC server is reachable and re-run; the job was marked failed without outputs.")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _work(job, project, args, target) -> dict:
    progress = _EventProgress(job)
    job_dir = Path(str(project.dir)) / job.uid
    project_dir = str(project.dir)
    from .commands._common import resolve_device

    device = resolve_device(args.device)
    trainer_log = []
    model_dir = Path(args.model) if args.model else job_dir / "model"
    if args.train:
        ds = job.load_input("train_particles")
        if "alignments3D/pose" not in ds.fields():
            raise CryoforumError("the training particles have no alignments3D (poses).",
                                 fix="connect the particles output of a refinement (e.g. Homogeneous Refinement).")
        ps = from_dataset(ds, project_dir=project_dir)
        ps.validate_images()
        cfg = TrainConfig(**{k: getattr(args, k) for k in ("epochs", "box", "width", "sym") if getattr(args, k) is not None})
        trainer = Trainer(ps, model_dir, cfg, device, progress=False,
                          abort_check=lambda: progress(f"training: epoch {trainer.epoch + 1}/{cfg.epochs}"))
        trainer.train()
        trainer_log = trainer.log
        progress(f"training done: validation median error {np.degrees(trainer.best):.1f}°", force=True)
    pred_ds = job.load_input(target)
    ps = from_dataset(pred_ds, project_dir=project_dir)
    ps.validate_images()
    progress(f"predicting {len(ps)} particles")
    pred = predict(ps, model_dir, device=device, progress=False)
    ps = with_predictions(ps, pred)
    keep = keep_by_quantile(uncertainty_score(pred.dispersion, args.statistic), args.drop)
    # everything is computed before anything is saved: a failure above leaves the job without outputs
    outputs = {"predicted": _fill_alignments(job.alloc_output("predicted", pred_ds), ps)}
    for name, mask in (("confident", keep), ("rejected", ~keep)):
        rows = np.nonzero(mask)[0]
        outputs[name] = _fill_alignments(job.alloc_output(name, pred_ds.take(rows)), ps, rows)
    side = io.BytesIO()
    uncertainty_dataset(ps).save(side)
    _plot_log(job, trainer_log, pred.dispersion["trace"])
    for name, dataset in outputs.items():
        job.save_output(name, dataset)
    job.upload("cryoforum_uncertainty.cs", side.getvalue())
    progress(f"done: {int(keep.sum())} confident, {int((~keep).sum())} rejected; "
             f"{pred.particles_per_second:.0f} particles/s", force=True)
    return {"particles": len(ps), "confident": int(keep.sum()), "rejected": int((~keep).sum()),
            "model": str(model_dir)}
