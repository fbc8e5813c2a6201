"""The package's folders are its layers (docs/architecture.md): a module imports only from its own layer or the
layers below it (imports inside functions included), there is no import cycle, no module is over 450 lines and
the package's top level holds at most 10 modules. The layer of a module is the layer of its folder: there is
no list of modules to maintain, and a new folder must be given a layer here before its first test run."""

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cryoforum_plugin"
FRONT, PIPELINE, ENGINE, CORE = 3, 2, 1, 0
# folder (or top-level module) -> layer; a top-level module not named here is core
LAYERS = {
    "relion_external": FRONT, "commands": FRONT, "adapters": FRONT, "cli": FRONT, "clidoc": FRONT,
    "pipeline": PIPELINE,
    "train": ENGINE, "nn": ENGINE, "refine": ENGINE, "infer": ENGINE, "sim": ENGINE,
    "physics": CORE, "formats": CORE, "data": CORE,
}
MAX_LINES, MAX_TOP_LEVEL = 450, 10


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the package and of the RELION adapter."""
    out = {}
    for path in sorted((root / "cryoforum_plugin").rglob("*.py")) + sorted((root / "relion_external").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer(module: str, root: Path = ROOT) -> int:
    """Layer of a dotted module name: its folder's (the first name below the package)."""
    parts = module.split(".")
    if parts[0] == "relion_external":
        return FRONT
    if len(parts) == 1:
        return CORE  # the package itself (__init__)
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    if (root / parts[0] / parts[1]).is_dir():
        raise AssertionError(f"folder {parts[0]}/{parts[1]} has no layer: add it to LAYERS in {__file__} "
                             "and to docs/architecture.md")
    return CORE


def project_imports(path: Path, module: str, known: dict[str, Path]):
    """Project modules imported anywhere in the file (functions included), as dotted names."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]  # resolved below to the module they are in
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in ("cryoforum_plugin", "relion_external"):
                continue
            parts = name.split(".")  # a name imported from a module is not a module: keep the deepest module
            while len(parts) > 1 and ".".join(parts) not in known:
                parts = parts[:-1]
            if ".".join(parts) != module:
                yield ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {m: set(project_imports(p, m, known)) for m, p in known.items()}


def upward_imports(root: Path = ROOT) -> list[str]:
    graph = import_graph(root)
    return [f"{m} (layer {layer(m, root)}) imports {t} (layer {layer(t, root)})"
            for m, targets in graph.items() for t in sorted(targets)
            if t not in ("cryoforum_plugin", "relion_external") and layer(t, root) > layer(m, root)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_from_a_layer_above_it():
    violations = upward_imports()
    assert not violations, "\n".join(violations)


def test_the_check_catches_an_upward_import(tmp_path):
    """Inject an import of the pipeline into a physics module of a copy of the package: the check must name it."""
    for folder in ("cryoforum_plugin", "relion_external"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.mrc"))
    assert upward_imports(tmp_path) == []
    victim = tmp_path / "cryoforum_plugin" / "physics" / "fourier.py"
    victim.write_text(victim.read_text() + "\n\ndef _late():\n    from cryoforum_plugin.pipeline import job  # noqa\n")
    found = upward_imports(tmp_path)
    assert found == ["cryoforum_plugin.physics.fourier (layer 0) imports cryoforum_plugin.pipeline.job (layer 2)"]
    (tmp_path / "cryoforum_plugin" / "newroom").mkdir()
    with pytest.raises(AssertionError, match="has no layer"):
        layer("cryoforum_plugin.newroom.x", tmp_path)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_are_small_and_the_top_level_is_short():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules at the package's top level: {top}"
