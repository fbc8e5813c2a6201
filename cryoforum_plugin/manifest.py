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


def namespace(job_name: str, **values) -> argparse.Namespace:
    """An argparse-like namespace for a job: its declared defaults overridden by ``values`` (for adapters and
    the demo, which call the command modules without a command line)."""
    ns = defaults(job_name)
    ns.update({p["name"]: None for p in params(job_name) if p.get("positional")})
    ns.update(values)
    return argparse.Namespace(**ns)


def _help(p: dict) -> str:
    text = p.get("help", "").replace("%", "%%")  # argparse expands %-formats in help strings
    extra = []
    if p.get("unit"):
        extra.append(f"unit: {p['unit']}")
    if "min" in p or "max" in p:
        extra.append(f"range: [{p.get('min', '-inf')}, {p.get('max', 'inf')}]")
    if not p.get("positional") and p.get("type") != "bool" and p.get("default") is not None:
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
    own = params(job_name)
    add_arguments_from(parser, own)
    if job(job_name).get("pipeline"):
        add_arguments_from(parser, pipeline_params(exclude={p["name"] for p in own}))


def add_arguments_from(parser: argparse.ArgumentParser, declarations: list[dict]) -> None:
    """Declare the given parameter declarations on an argparse parser."""
    for p in declarations:
        kwargs = {"help": _help(p)}
        if p.get("type") == "bool":
            parser.add_argument("--" + p["name"].replace("_", "-"), dest=p["name"],
                                action=argparse.BooleanOptionalAction, default=bool(p.get("default", False)),
                                help=kwargs["help"])
            continue
        kwargs["type"] = _typed(p)
        if p.get("choices"):
            kwargs["choices"] = p["choices"]
        if p.get("nargs"):
            kwargs["nargs"] = p["nargs"]
        if p.get("positional"):
            parser.add_argument(p["name"], metavar=p["name"].upper(), **kwargs)
        else:
            parser.add_argument("--" + p["name"].replace("_", "-"), dest=p["name"], default=p.get("default"),
                                required=bool(p.get("required", False)),
                                metavar=None if p.get("choices") else p.get("metavar", p.get("type", "str").upper()), **kwargs)
