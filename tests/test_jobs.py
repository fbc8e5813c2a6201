"""The job seam: every front end's options come from one declaration, and the steps take typed inputs."""

import pytest

from cryoforum_plugin import jobs, manifest
from cryoforum_plugin.cli import build_parser
from cryoforum_plugin.errors import CryoforumError


def test_options_are_the_pipeline_declarations_with_their_defaults():
    opts = jobs.options(head="quat")
    assert opts.head == "quat" and opts.drop == manifest.defaults("filter")["drop"]
    assert opts.global_search == manifest.defaults("refine")["global_search"] and opts.refine is True
    with pytest.raises(CryoforumError, match="unknown option"):
        jobs.options(no_such_option=1)


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
