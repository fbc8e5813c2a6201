"""Generate docs/cli.md from plugin.yaml, so the CLI reference cannot drift from the code.

    python -m cryoforum_plugin.clidoc > docs/cli.md     (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

from cryoforum_plugin import manifest


def _default(p: dict) -> str:
    if p.get("positional"):
        return "(positional)"
    if p.get("required"):
        return "(required)"
    d = p.get("default")
    return "" if d is None or d == "" else f"`{d}`"


def render() -> str:
    meta = manifest.load()
    lines = [f"# `cryoforum` command-line reference (version {meta['version']})", "",
             "Generated from `plugin.yaml` by `python -m cryoforum_plugin.clidoc`; the same declarations build the "
             "CLI, the RELION External job form and the cryoSPARC job parameters.", ""]
    for name, job in meta["jobs"].items():
        title = "RELION External job (`cryoforum-relion`)" if name == "relion" else f"`cryoforum {name}`"
        lines += [f"## {title}", "", job["help"], "", "| option | type | default | unit / range | help |",
                  "|---|---|---|---|---|"]
        for p in manifest.params(name):
            flag = p["name"].upper() if p.get("positional") else "--" + p["name"].replace("_", "-")
            kind = p.get("type", "str") + (f" ({'/'.join(map(str, p['choices']))})" if p.get("choices") else "")
            rng = p.get("unit", "")
            if "min" in p or "max" in p:
                rng += f" [{p.get('min', '')}, {p.get('max', '')}]"
            form = " *(on the RELION form)*" if p.get("relion_form") else ""
            lines.append(f"| `{flag}` | {kind} | {_default(p)} | {rng.strip()} | {p.get('help', '')}{form} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
