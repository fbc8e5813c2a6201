"""The ``cryoforum`` console command: one subcommand per module in ``cryoforum_plugin.commands``.

Each command module has ``add_args(parser)`` (its parameters come from plugin.yaml) and ``main(args)``.
User errors (``CryoforumError``) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cryoforum_plugin import __version__
from cryoforum_plugin import manifest
from cryoforum_plugin.errors import CryoforumError

COMMANDS = ["info", "convert", "simulate", "reconstruct", "fsc", "train", "predict", "refine", "evaluate", "filter",
            "report", "run", "watch", "demo", "cryosparc"]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand."""
    meta = manifest.load()
    parser = argparse.ArgumentParser(prog="cryoforum", description=meta["description"].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cryoforum {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        help_text = manifest.job(name)["help"]
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_args(p)
        p.set_defaults(_main=module.main, _parser=p)
    return parser


def main(argv=None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ok = False
    try:
        result = args._main(args)
        ok = True
    except CryoforumError as exc:
        print(f"cryoforum {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoforum {args.command}: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    finally:
        from cryoforum_plugin.runtime import shutdown

        shutdown(wait=ok)  # no-op unless started by torchrun
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
