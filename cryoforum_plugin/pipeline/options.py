"""The options of a pipeline job: every option of the train, predict, refine and filter steps (declared once in
plugin.yaml, ``manifest.pipeline_params``) as one namespace, from keyword values or a front end's command line.
``job.pipeline`` reads them; ``TrainConfig.from_args`` turns the training ones into a configuration."""

from __future__ import annotations

import argparse

from cryoforum_plugin import manifest
from cryoforum_plugin.errors import CryoforumError


def options(**values) -> argparse.Namespace:
    """Every pipeline option (manifest.pipeline_params: train, predict, refine, filter) at its plugin.yaml default,
    plus ``resume`` (false) and ``refine`` (true), overridden by ``values``; unknown names are refused. A value
    None means "not given": the train options a preset may set (manifest.preset_options) then stay None, for
    ``TrainConfig.from_args`` to fill from --preset or plugin.yaml; every other option gets its default."""
    unset = manifest.preset_options()
    known = {p["name"]: None if p["name"] in unset else p.get("default") for p in manifest.pipeline_params()}
    known.update(resume=False, refine=True)
    unknown = set(values) - set(known)
    if unknown:
        raise CryoforumError(f"unknown option(s): {', '.join(sorted(unknown))}.",
                             fix="see `cryoforum train --help`, `predict --help` and `filter --help`.")
    return argparse.Namespace(**{**known, **{k: v for k, v in values.items() if v is not None}})


def options_from(args, **values) -> argparse.Namespace:
    """``options`` from a front end's parsed command line (an argparse namespace): every pipeline option it
    carries, as given (None = not given), then ``values`` (the front end's own settings, e.g. its thread count)."""
    names = [p["name"] for p in manifest.pipeline_params()]
    return options(**{**{n: getattr(args, n) for n in names if hasattr(args, n)}, **values})
