"""The plugin manifest (``plugin.yaml``): jobs and user parameters, read by the CLI and both adapters."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import yaml

_TYPES = {"int": int, "float": float, "str": str, "path": str, "choice": str}


def manifest_path() -> Path:
    """Location of plugin.yaml: packaged beside this module (a link to the top-level file in a checkout)."""
    return Path(__file__).with_name("plugin.yaml")


@functools.lru_cache(maxsize=1)
def load() -> dict:
    """The parsed manifest."""
    with open(manifest_path()) as fh:
        return yaml.safe_load(fh)


def job(name: str) -> dict:
    """One job's entry (help, params)."""
    return load()["jobs"][name]


def params(job_name: str) -> list[dict]:
    """The job's parameters, in declaration order. An entry ``{use: JOB.NAME, ...}`` re-uses another job's
    declaration (its other keys override), so a parameter is declared once and shown in several places."""
    out = []
    for p in job(job_name).get("params", []):
        if "use" in p:
            other, name = p["use"].split(".", 1)
            base = next((q for q in params(other) if q["name"] == name), None)
            if base is None:
                raise KeyError(f"plugin.yaml: {job_name} uses unknown parameter {p['use']}")
            p = {**base, **{k: v for k, v in p.items() if k != "use"}}
        out.append(dict(p))
    return out


def defaults(job_name: str) -> dict:
    """{parameter name: default} for the job's optional parameters."""
    return {p["name"]: p.get("default") for p in params(job_name) if not p.get("positional")}


TRAIN_RUNTIME = frozenset({"particles", "out", "project_dir", "preset", "resume", "device", "threads", "cache_gb",
                           "workers", "compile"})
"""The train job's parameters that are files and run-time settings, not options of the trained model."""
SHARED_TRAIN_OPTIONS = frozenset({"sym"})
"""Model options that other steps of a job also read (the refinement's and the reconstruction's point group): they
keep their plugin.yaml default on a command line, and no preset sets them."""


def train_options() -> frozenset:
    """The names of the train job's model options: the fields of ``train_config.TrainConfig``."""
    return frozenset(p["name"] for p in params("train") if not p.get("positional")) - TRAIN_RUNTIME


def preset_options() -> frozenset:
    """The train options a ``--preset`` may set. A front end leaves each at None ("not given") unless the user
    gives it, and ``TrainConfig.from_args`` resolves it: the user's value, else the preset's, else plugin.yaml's
    default. So a value the user gives is never replaced by a preset, even when it equals the default."""
    return train_options() - SHARED_TRAIN_OPTIONS


def unset_by_default(job_name: str) -> frozenset:
    """The options of ``job_name`` whose command-line default is None (not given): ``preset_options`` for the
    train job and the jobs that train (``pipeline: true``); none for the others (predict's --batch is its own)."""
    return preset_options() if job_name == "train" or job(job_name).get("pipeline") else frozenset()


def namespace(job_name: str, **values) -> argparse.Namespace:
    """An argparse-like namespace for a job: its declared defaults (None for ``unset_by_default``) overridden by
    ``values``, as its command line would give it (for callers without a command line)."""
    ns = {**defaults(job_name), **{name: None for name in unset_by_default(job_name)}}
    ns.update({p["name"]: None for p in params(job_name) if p.get("positional")})
    ns.update(values)
    return argparse.Namespace(**ns)


def _help(p: dict, unset: bool = False) -> str:
    """The help text of a declaration, with its unit, range and plugin.yaml default (also for an option whose
    argparse default is None, ``unset``: the default applies unless a preset sets it)."""
    text = p.get("help", "").replace("%", "%%")  # argparse expands %-formats in help strings
    extra = []
    if p.get("unit"):
        extra.append(f"unit: {p['unit']}")
    if "min" in p or "max" in p:
        extra.append(f"range: [{p.get('min', '-inf')}, {p.get('max', 'inf')}]")
    if unset and p.get("default") is not None:
        extra.append("default: " + str(p["default"]).replace("%", "%%") + ", unless --preset sets it")
    elif not p.get("positional") and p.get("type") != "bool" and p.get("default") is not None:
        extra.append("default: %(default)s")
    return text + (f" ({'; '.join(extra)})" if extra else "")


def _typed(p: dict):
    conv = _TYPES[p.get("type", "str")]
    lo, hi = p.get("min"), p.get("max")

    def convert(text):
        try:
            value = conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {p.get('type')}, got '{text}'") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is outside [{lo}, {hi}]")
        return value

    convert.__name__ = p.get("type", "str")
    return convert


PIPELINE_JOBS = ("train", "predict", "refine", "filter")
"""Engine jobs whose options a train-predict job (``pipeline: true`` in plugin.yaml) accepts."""
PIPELINE_IO = {"particles", "out", "model", "predicted", "format", "project_dir", "uncertainty", "resume",
               "reference", "half_maps"}
"""Their file arguments, which the front end sets itself."""


def pipeline_params(exclude=()) -> list[dict]:
    """The option declarations of the train, predict and filter jobs (first declaration of each name wins),
    without their file arguments and without the names in ``exclude``."""
    out, seen = [], set(exclude) | PIPELINE_IO
    for name in PIPELINE_JOBS:
        for p in params(name):
            if p.get("positional") or p["name"] in seen:
                continue
            seen.add(p["name"])
            out.append(dict(p, required=False))
    return out


def add_arguments(parser: argparse.ArgumentParser, job_name: str) -> None:
    """Declare every parameter of ``job_name`` on an argparse parser (names: --snake-case); a job with
    ``pipeline: true`` also gets every engine option (``pipeline_params``)."""
    own, unset = params(job_name), unset_by_default(job_name)
    add_arguments_from(parser, own, unset)
    if job(job_name).get("pipeline"):
        add_arguments_from(parser, pipeline_params(exclude={p["name"] for p in own}), unset)


def add_arguments_from(parser: argparse.ArgumentParser, declarations: list[dict], unset=frozenset()) -> None:
    """Declare the given parameter declarations on an argparse parser; the names in ``unset`` default to None
    (not given: a preset or plugin.yaml's default fills them later, ``TrainConfig.from_args``)."""
    for p in declarations:
        none = p["name"] in unset
        kwargs = {"help": _help(p, none)}
        if p.get("type") == "bool":
            parser.add_argument("--" + p["name"].replace("_", "-"), dest=p["name"],
                                action=argparse.BooleanOptionalAction,
                                default=None if none else bool(p.get("default", False)), help=kwargs["help"])
            continue
        kwargs["type"] = _typed(p)
        if p.get("choices"):
            kwargs["choices"] = p["choices"]
        if p.get("nargs"):
            kwargs["nargs"] = p["nargs"]
        if p.get("positional"):
            parser.add_argument(p["name"], metavar=p["name"].upper(), **kwargs)
        else:
            parser.add_argument("--" + p["name"].replace("_", "-"), dest=p["name"],
                                default=None if none else p.get("default"),
                                required=bool(p.get("required", False)),
                                metavar=None if p.get("choices") else p.get("metavar", p.get("type", "str").upper()), **kwargs)
