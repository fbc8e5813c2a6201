"""The layers of docs/architecture.md hold: no module imports from a layer above its own (imports inside
functions included), so front ends translate, ``jobs`` decides, the engine computes, the core does I/O and
physics."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cryoforum_plugin"
FRONT, JOBS, ENGINE, CORE = 3, 2, 1, 0
ENGINE_MODULES = {"training", "train_config", "model_dir", "prediction", "cleanup", "evaluation", "reconstruction",
                  "refinement", "distributed", "reporting"}


def layer(module: str) -> int:
    """Layer of a dotted module name inside the project."""
    parts = module.split(".")
    if parts[0] == "relion_external" or parts[1:2] in (["commands"], ["adapters"], ["cli"], ["clidoc"]):
        return FRONT
    if parts[1:2] == ["jobs"]:
        return JOBS
    if len(parts) > 1 and parts[1] in ENGINE_MODULES:
        return ENGINE
    return CORE


def project_imports(path: Path, module: str):
    """Project modules imported anywhere in the file, as dotted names."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in ("cryoforum_plugin", "relion_external"):
                # a name imported from a package may be a submodule: judge by the deepest existing module
                parts = name.split(".")
                while len(parts) > 1 and not ((ROOT / "/".join(parts)).with_suffix(".py").exists()
                                              or (ROOT / "/".join(parts) / "__init__.py").exists()):
                    parts = parts[:-1]
                yield ".".join(parts)


def test_no_module_imports_from_a_layer_above_it():
    violations = []
    for path in list(PKG.rglob("*.py")) + list((ROOT / "relion_external").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module.endswith("__init__"):
            module = module.rsplit(".", 1)[0]
        for target in project_imports(path, module):
            if target.split(".")[-1] == "__init__" or target in ("cryoforum_plugin", "relion_external"):
                continue
            if layer(target) > layer(module):
                violations.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
    assert not violations, "\n".join(violations)


def test_the_check_catches_an_upward_import():
    assert layer("cryoforum_plugin.commands.train") > layer("cryoforum_plugin.jobs") > layer(
        "cryoforum_plugin.training") > layer("cryoforum_plugin.particles")
    assert layer("relion_external.cryoforum_relion") == FRONT
