"""The job seam: every front end's options come from one declaration, and the steps take typed inputs."""

import pytest

from cryoforum_plugin.pipeline import options as pipeline_options
from cryoforum_plugin import manifest
from cryoforum_plugin.cli import build_parser
from cryoforum_plugin.errors import CryoforumError


def test_options_are_the_pipeline_declarations_with_their_defaults():
    opts = pipeline_options.options(head="quat")
    assert opts.head == "quat" and opts.drop == manifest.defaults("filter")["drop"]
    assert opts.global_search == manifest.defaults("refine")["global_search"] and opts.refine is True
    with pytest.raises(CryoforumError, match="unknown option"):
        pipeline_options.options(no_such_option=1)


def test_both_adapters_accept_every_engine_option():
    from relion_external.cryoforum_relion import build_parser as relion_parser

    cryosparc = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "cryosparc")[1]
    for parser in (relion_parser(), cryosparc):
        dests = {a.dest for a in parser._actions}
        missing = [p["name"] for p in manifest.pipeline_params() if p["name"] not in dests]
        assert not missing, missing
    args, _ = relion_parser().parse_known_args(["--o", "x/", "--head", "quat", "--target-error", "10",
                                                "--global-search", "all"])
    assert args.head == "quat" and args.target_error == 10 and args.global_search == "all"


def _subparser(name):
    return next(p for n, p in build_parser()._subparsers._group_actions[0].choices.items() if n == name)


def test_an_option_the_user_gives_is_never_replaced_by_a_preset(tmp_path):
    """--head qcqp and --epochs 50 are plugin.yaml's defaults, and the cpu preset sets other values (grid head,
    5 epochs): given by the user they are kept, through every front end (the CLI's train and run commands, the
    RELION External job, the cryoSPARC job), and the options not given take the preset's values."""
    from relion_external.cryoforum_relion import job_options as relion_options
    from relion_external.cryoforum_relion import job_star_text, parse

    from cryoforum_plugin.adapters.cryosparc import job_options as cryosparc_options
    from cryoforum_plugin.train.config import PRESETS, TrainConfig

    cpu, declared = PRESETS["cpu"], manifest.defaults("train")
    assert (declared["head"], declared["epochs"]) == ("qcqp", 50) and (cpu["head"], cpu["epochs"]) == ("grid", 5)
    assert declared["augment_psi"] is False and cpu["augment_psi"] is True

    def front_ends(*argv):
        """The TrainConfig each front end builds from the same user options."""
        cli = build_parser().parse_args(["train", "--particles", "p.star", *argv])
        run = build_parser().parse_args(["run", "--train", "p.star", *argv])
        relion, _ = parse(["--o", "x/", "--in_parts", "p.star", *argv, "--j", "2"])
        cs = build_parser().parse_args(["cryosparc", "--project", "P1", "--workspace", "W1", "--train",
                                        "J1:particles", *argv])
        from cryoforum_plugin.commands.run import job_options as run_options

        return {"cli": TrainConfig.from_args(cli), "run": TrainConfig.from_args(run_options(run)),
                "relion": TrainConfig.from_args(relion_options(relion)),
                "cryosparc": TrainConfig.from_args(cryosparc_options(cs))}

    given = front_ends("--preset", "cpu", "--head", "qcqp", "--epochs", "50", "--no-augment-psi")
    for name, config in given.items():
        assert (config.head, config.epochs, config.augment_psi) == ("qcqp", 50, False), name  # the user's
        assert (config.box, config.time_budget, config.lr) == (cpu["box"], cpu["time_budget"], cpu["lr"]), name
    for name, config in front_ends("--preset", "cpu").items():
        assert config == TrainConfig(**cpu), name  # nothing given: the preset's values, plugin.yaml's for the rest
    for name, config in front_ends("--preset", "paper").items():
        assert config == TrainConfig(), name
    # RELION passes a form field left empty as a bare label: not given. The job.star leaves the fields a preset
    # sets empty, so the form shows only values the job uses
    relion, _ = parse(["--o", "x/", "--in_parts", "p.star", "--mode", "train", "--model", "--epochs", "--box",
                       "--sym", "C1", "--gpu", "--preset", "cpu", "--j", "2", "--config"])
    opts = relion_options(relion)
    assert TrainConfig.from_args(opts) == TrainConfig(**cpu) and relion.model is None and relion.mode == "train"
    assert "param3_label epochs\nparam3_value \"\"" in job_star_text()
    cfg = tmp_path / "more.yaml"
    cfg.write_text("head: qcqp\nwidth: 0.5\n")
    relion, _ = parse(["--o", "x/", "--in_parts", "p.star", "--preset", "cpu", "--config", str(cfg), "--j", "2"])
    config = TrainConfig.from_args(relion_options(relion))
    assert (config.head, config.width, config.box) == ("qcqp", 0.5, 64)  # the config file's options are given
    # every other option of the job keeps a real value for the steps that read it
    assert (opts.sym, opts.threads, opts.drop, opts.device, opts.global_search) == ("C1", 2, 0.25, "auto", "auto")
    args = _subparser("train").parse_args(["--particles", "p.star"])
    assert args.head is None and args.threads == 0 and args.device == "auto" and args.sym == "C1"
    assert "default: qcqp" in _subparser("train").format_help()  # --help still shows plugin.yaml's default
