#!/usr/bin/env python3
"""cryo-forum as a RELION External job: translates RELION's contract to the engine and back.

RELION runs:  cryoforum-relion --o External/jobNNN/ --in_parts particles.star [--in_3dref F] [--in_mask F]
              [--<label> <value> ... (the form's parameters)] --j N [additional arguments]
              [--pipeline_control External/jobNNN/]
and expects in --o: the outputs, RELION_OUTPUT_NODES.star, and one exit marker (RELION_JOB_EXIT_SUCCESS,
_FAILURE or _ABORTED). Progress goes to stdout (run.out), the one-line error to stderr (run.err).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from cryoforum_plugin.progress import Events

OUTPUT_NODE_TYPES = {  # file -> (RELION 3.1 integer type, RELION 4/5 type label)
    "particles": (3, "ParticleGroupMetadata.star.relion"),
    "map": (6, "DensityMap.mrc"),
    "model": (8, "ProcessData.pt.cryoforum"),
}


class JobAborted(Exception):
    """The user pressed Abort in the RELION GUI (RELION_JOB_ABORT_NOW)."""


def build_parser():
    """RELION's own arguments, the form's parameters and every engine option (all declared in plugin.yaml)."""
    from cryoforum_plugin import manifest

    parser = argparse.ArgumentParser(prog="cryoforum-relion", description=manifest.job("relion")["help"],
                                     allow_abbrev=False)
    parser.add_argument("--o", required=True, help="RELION job directory (External/jobNNN/).")
    parser.add_argument("--in_parts", default=None, help="Input particle STAR file.")
    parser.add_argument("--in_3dref", default=None, help="Reference map for the refinement (the consensus map).")
    parser.add_argument("--in_mask", default=None, help="Optional mask (unused; accepted).")
    parser.add_argument("--j", type=int, default=1, help="Threads (CPU).")
    parser.add_argument("--pipeline_control", default=None, help="Set by RELION; accepted.")
    manifest.add_arguments(parser, "relion")
    return parser


def without_empty_values(parser, argv) -> list[str]:
    """``argv`` without the options given no value: RELION passes a form field whose value is empty as a bare
    ``--label`` (followed by the next ``--`` argument, or last), meaning "not given" (the option's default, or
    for a training option the preset's value)."""
    takes_value = {s for a in parser._actions if a.nargs is None and a.option_strings
                   and not isinstance(a, argparse.BooleanOptionalAction) for s in a.option_strings}
    return [a for i, a in enumerate(argv)
            if not (a in takes_value and (i + 1 == len(argv) or argv[i + 1].startswith("--")))]


def normalised_choices(parser, argv) -> list[str]:
    """``argv`` with the value of every option that has choices matched to its choice case-insensitively and
    without surrounding blanks (a form or a Scheme variable typed 'Predict ')."""
    choices = {s: a.choices for a in parser._actions if a.choices and a.option_strings for s in a.option_strings}
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] in choices:
            match = [c for c in choices[out[i]] if str(c).lower() == out[i + 1].strip().lower()]
            out[i + 1] = str(match[0]) if match else out[i + 1]
    return out


def parse(argv):
    """Parse leniently, as RELION's GUI, relion_scheduler and Schemes call the job: unknown arguments (e.g. a
    scheduler's --continue, input flags of other node types) are reported in run.out and ignored; a form field
    left empty is not given (``without_empty_values``); choices match in any case (``normalised_choices``). A
    config YAML sets defaults (options it names count as given)."""
    parser = build_parser()
    argv = normalised_choices(parser, without_empty_values(parser, argv))
    args, unknown = parser.parse_known_args(argv)
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
        args, unknown = parser.parse_known_args(argv)
    return args, unknown


class RelionEvents(Events):
    """The job's events: lines to run.out (stdout), abort when RELION writes RELION_JOB_ABORT_NOW."""

    def __init__(self, job_dir: Path):
        super().__init__(sys.stdout)
        self.abort_file = Path(job_dir) / "RELION_JOB_ABORT_NOW"

    def check_abort(self) -> None:
        if self.abort_file.exists():
            raise JobAborted()


def write_output_nodes(job_dir: Path, nodes: list[tuple[str, str]]) -> None:
    """RELION_OUTPUT_NODES.star with both the 3.1 integer type and the 4/5 label (one file for every version)."""
    from cryoforum_plugin.formats.atomic import write_text

    lines = ["", "# version 30001", "", "data_output_nodes", "", "loop_",
             "_rlnPipeLineNodeName #1", "_rlnPipeLineNodeType #2", "_rlnPipeLineNodeTypeLabel #3"]
    for path, kind in nodes:
        number, label = OUTPUT_NODE_TYPES[kind]
        lines.append(f"{path} {number} {label}")
    write_text(job_dir / "RELION_OUTPUT_NODES.star", "\n".join(lines) + "\n \n")


def job_options(args) -> argparse.Namespace:
    """The pipeline options (``pipeline_options.options``) of a parsed job: the options the form, the config YAML
    and the additional arguments gave, None for training options not given (the preset fills them), --j as threads,
    the gpu field (RELION's syntax, ``runtime.device_from_relion_gpu``) as the device when it is given."""
    from cryoforum_plugin import runtime
    from cryoforum_plugin.pipeline import options as pipeline_options

    opts = pipeline_options.options_from(args, threads=args.j, resume=True)
    opts.device = runtime.device_from_relion_gpu(args.gpu, runtime.local_rank()) or opts.device
    return opts


def run(args, job_dir: Path) -> list[tuple[str, str]] | None:
    """The job itself: RELION's inputs -> the pipeline steps -> RELION's outputs; returns the output nodes (paths
    relative to the project directory), None on the non-zero ranks of a torchrun job (rank 0 writes the outputs)."""
    from cryoforum_plugin.pipeline import steps
    from cryoforum_plugin.pipeline import job as pipeline_job
    from cryoforum_plugin.errors import CryoforumError
    from cryoforum_plugin.formats.files import read_particles
    from cryoforum_plugin import runtime

    events = RelionEvents(job_dir)
    if not args.in_parts:
        raise CryoforumError("no input particles.", fix="set 'Input particles' (--in_parts) on the I/O tab.")
    opts = job_options(args)
    model_dir = job_dir / "model"
    opts.refine = args.refine == "yes"
    reference = steps.Reference.from_files(args.in_3dref) if (opts.refine and args.in_3dref) else None
    if args.mode == "predict":
        if not args.model:
            raise CryoforumError("mode predict needs a trained model.",
                                 fix="set 'model' to the model directory of an earlier cryo-forum job.")
        if runtime.init_from_env(opts.device)[1] > 1:  # the watcher's ledger has one writer
            raise CryoforumError("mode predict runs as one process, not under torchrun.",
                                 fix="run the job without torchrun, with one id (or none) in gpu.")
        return predict_new_rows(args, opts, job_dir, Path(args.model), reference, events)
    ps = read_particles(args.in_parts)
    if args.mode == "train":
        events.message(f"[cryo-forum] training on {args.in_parts} -> {model_dir}")
        from cryoforum_plugin.train.config import TrainConfig

        steps.train(ps, model_dir, TrainConfig.from_args(opts), device=opts.device, resume=True,
                    workers=opts.workers, cache_gb=opts.cache_gb, events=events, compile=opts.compile)
        from cryoforum_plugin.train.model_dir import ModelDir

        return [(str(ModelDir(model_dir).best_path), "model")]
    result = pipeline_job.pipeline(opts, train_set=ps if args.mode == "train_predict" else None, predict_set=ps,
                                   model_dir=model_dir, reference=reference, events=events)
    if result is None:  # a non-zero rank under torchrun: rank 0 writes the outputs
        return None
    return pipeline_job.write_outputs(result, job_dir, args.in_parts, opts, fmt="star",
                                      reconstruct_map=args.reconstruct == "yes", events=events)


def predict_new_rows(args, opts, job_dir: Path, model_dir: Path, reference, events) -> list[tuple[str, str]]:
    """Mode predict: the particles of --in_parts not yet processed by this job (a growing STAR: RELION's "Continue",
    or a step of a relion_scheduler schedule / Scheme, runs the job again on more rows), through the stream of
    ``cryoforum watch`` (``pipeline.watch.Watcher``, its ledger in the job directory), once; the outputs hold every
    particle so far. A problem with the input (unreadable, a missing stack) fails the job."""
    from cryoforum_plugin.errors import CryoforumError
    from cryoforum_plugin.pipeline.stream import ParticleFiles
    from cryoforum_plugin.pipeline.watch import MAP_NAME, Watcher, WatchSettings

    if not Path(args.in_parts).is_file():
        raise CryoforumError("particle file not found.", path=args.in_parts, fix="check 'Input particles'.")
    settings = WatchSettings(settle=0.0, until_idle=0.0, map_every=0, reconstruct=args.reconstruct == "yes")
    source = ParticleFiles(args.in_parts, batch_size=settings.batch_size, settle=0.0, events=events)
    status = Watcher(source, job_dir, model_dir, reference, opts, settings, events=events).run()
    if status["problems"]:  # a watcher goes on past a file it cannot use; this job is about that one file
        raise CryoforumError(next(iter(status["problems"].values())))
    events.message(f"[cryo-forum] {status['this_run']['particles']} new particles; {status['particles_done']} "
                   f"processed by this job so far")
    names = [("predicted.star", "particles"), ("refined.star", "particles"), ("confident.star", "particles"),
             ("rejected.star", "particles"), (MAP_NAME, "map")]
    return [(str(job_dir / name), kind) for name, kind in names if (job_dir / name).exists()]


def job_star_text(fn_exe: str = "cryoforum-relion") -> str:
    """A RELION job.star that pre-fills the External job form with cryo-forum's parameters from plugin.yaml (label =
    option name, value = default; empty for a training option a preset sets, so the preset decides unless the user
    types a value). Load it in the GUI to start from these settings, or copy it into a Scheme. It names the job
    type both ways: ``_rlnJobTypeLabel relion.external`` (RELION 4 and 5, whose Schemes read the label) and
    ``_rlnJobType 99`` (RELION 3.1, which warns about the label it does not know and keeps going)."""
    from cryoforum_plugin import manifest

    form = [p for p in manifest.params("relion") if p.get("relion_form")][:10]
    unset = manifest.unset_by_default("relion")
    values = {"fn_exe": fn_exe, "in_3dref": '""', "in_coords": '""', "in_mask": '""', "in_mic": '""',
              "in_mov": '""', "in_part": '""', "nr_threads": "4", "other_args": '""', "do_queue": "No",
              "min_dedicated": "1", "qsub": "sbatch", "qsubscript": '""', "queuename": '""'}
    for i in range(10):
        p = form[i] if i < len(form) else None
        default = "" if p is None or p.get("default") is None or p["name"] in unset else str(p["default"])
        values[f"param{i + 1}_label"] = p["name"] if p else '""'
        values[f"param{i + 1}_value"] = default if default else '""'
    rows = "\n".join(f"{k} {v}" for k, v in sorted(values.items()))
    return ("\n# version 30001\n\ndata_job\n\n_rlnJobTypeLabel relion.external\n_rlnJobType 99\n_rlnJobIsContinue 0\n"
            " \n\n# version 30001\n\n"
            "data_joboptions_values\n\nloop_\n_rlnJobOptionVariable #1\n_rlnJobOptionValue #2\n" + rows + "\n \n")


def _job_dir(argv) -> Path | None:
    for i, a in enumerate(argv):
        if a == "--o" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--o="):
            return Path(a[4:])
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0
    job_dir = _job_dir(argv)
    if job_dir is None:
        print("cryoforum-relion: error: --o JOB_DIR is required (RELION sets it).", file=sys.stderr)
        return 2
    job_dir.mkdir(parents=True, exist_ok=True)
    for marker in ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE", "RELION_JOB_EXIT_ABORTED"):
        (job_dir / marker).unlink(missing_ok=True)
    from cryoforum_plugin import runtime
    from cryoforum_plugin.errors import CryoforumError

    start = time.time()
    status = "FAILURE"
    main_rank = True  # under torchrun (several GPUs) only rank 0 writes the nodes and the success marker
    try:
        try:
            args, unknown = parse(argv)
        except SystemExit:  # argparse has printed its message to stderr (run.err)
            raise CryoforumError("bad job parameters (see the message above).",
                                 fix="correct the parameter on the Params tab or in 'Additional arguments'.") from None
        if unknown:
            print(f"[cryo-forum] ignoring unknown arguments: {' '.join(unknown)}", flush=True)
        nodes = run(args, job_dir)
        main_rank = runtime.is_main()
        if main_rank:
            write_output_nodes(job_dir, nodes)
            print(f"[cryo-forum] done in {time.time() - start:.0f} s", flush=True)
        status = "SUCCESS"
    except (JobAborted, KeyboardInterrupt):
        status = "ABORTED"
        print("[cryo-forum] aborted by the user; outputs written so far are complete files only.", flush=True)
    except CryoforumError as exc:
        print(f"cryo-forum error: {exc}", file=sys.stderr)
    except Exception as exc:  # an unexpected failure still ends the job for RELION, with one clear line
        print(f"cryo-forum internal error: {type(exc).__name__}: {exc}. Please report it with run.out.",
              file=sys.stderr)
        import traceback

        traceback.print_exc(file=sys.stdout)
    runtime.shutdown(wait=status == "SUCCESS")  # no-op unless started by torchrun
    if main_rank or status != "SUCCESS":
        (job_dir / f"RELION_JOB_EXIT_{status}").touch()
    return 0 if status == "SUCCESS" else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-job-star"]:  # regenerate relion_external/cryoforum_job.star from plugin.yaml
        Path(sys.argv[2]).write_text(job_star_text())
        sys.exit(0)
    sys.exit(main())
