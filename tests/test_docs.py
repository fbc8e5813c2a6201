"""Documentation and manifest stay in step with the code."""

import subprocess
import sys
from pathlib import Path

import tomllib

from cryoforum_plugin import __version__
from cryoforum_plugin import clidoc
from cryoforum_plugin import manifest
from cryoforum_plugin.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_generated_from_plugin_yaml():
    assert (ROOT / "docs" / "cli.md").read_text() == clidoc.render(), "run: python -m cryoforum_plugin.clidoc > docs/cli.md"


def test_versions_agree_and_packaged_manifest_is_the_top_level_file():
    assert manifest.load()["version"] == __version__
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
    assert manifest.manifest_path().resolve() == (ROOT / "plugin.yaml").resolve()


def test_every_subcommand_and_option_has_help_with_units():
    parser = build_parser()
    for name in COMMANDS:
        assert name in manifest.load()["jobs"]
        for p in manifest.params(name):
            assert p.get("help"), (name, p["name"])
    out = subprocess.run([sys.executable, "-m", "cryoforum_plugin.cli", "simulate", "--help"], capture_output=True,
                         text=True).stdout
    assert "--max-shift" in out and "unit: Å" in out and "default: 0.1" in out
    assert len([p for p in manifest.params("relion") if p.get("relion_form")]) <= 10  # RELION's form limit
    assert parser.prog == "cryoforum"


def test_every_help_page_renders():
    """`--help` of every subcommand and of the RELION executable prints (a '%' in a help text once broke it)."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name in COMMANDS:
        assert "usage:" in sub[name].format_help(), name
    from relion_external.cryoforum_relion import build_parser as relion_parser

    assert "--in_3dref" in relion_parser().format_help()
