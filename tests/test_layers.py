"""The package's import layers: no cycle between modules, and no module imports a layer above its own (an import
inside a function counts: it is a dependency all the same). DESIGN.md's flow, bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

import prefsift

ROOT = Path(prefsift.__file__).parent

# Lowest first. A module may import its own unit and the units of lower layers, never a unit of its layer or above.
LAYERS = [
    {"errors"},
    {"prefsift"},  # the package itself: its version and error classes
    {"output"},  # output directories and the regular-file check: over the errors only
    {"maths", "settings", "models", "manifest", "stats"},  # leaves and near-leaves
    {"config", "data", "scaling", "report"},  # report: the tables, over stats
    {"engine"},  # the model passes behind one entry point
    {"reference"},  # where a training's reference log-probs come from
    {"train"},  # DPO / KTO through TRL on the engine: the primitive that stages and the selective scorer call
    {"resources", "select"},
    {"evaluate", "weights", "export"},
    {"scorers", "synthetic"},
    {"score", "analyze", "run_report"},
    {"pipeline"},
    {"compare", "demo"},
    {"stages"},
    {"api"},  # the Python API: the functions the CLI's commands call
    {"cli"},
]
LEVEL = {unit: k for k, layer in enumerate(LAYERS) for unit in layer}
# The one import against the layers: the package's entry points (`prefsift.score(...)`) reach the API lazily, inside
# a function run on a user's first call, never while any module of the package is imported.
ENTRY_POINTS = {("prefsift", "prefsift.api")}


def module_name(path: Path) -> str:
    parts = ("prefsift",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(module: str) -> set[str]:
    """The prefsift modules `module` names in an import statement, anywhere in its file."""
    out = set()
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("prefsift")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("prefsift"):
                continue
            for alias in node.names:  # `from prefsift.engine import tokenize` names the submodule
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != module and (module, m) not in ENTRY_POINTS}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "prefsift"


def test_every_module_has_a_layer():
    assert {unit(m) for m in MODULES} <= set(LEVEL), sorted({unit(m) for m in MODULES} - set(LEVEL))


def test_no_module_imports_its_layer_or_above():
    upward = [f"{m} imports {t}" for m in sorted(MODULES) for t in sorted(imports(m))
              if unit(t) != unit(m) and LEVEL[unit(t)] >= LEVEL[unit(m)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_config_is_a_leaf():
    assert imports("prefsift.config") == {"prefsift.errors", "prefsift.settings"}
    assert imports("prefsift.settings") == {"prefsift.errors"}


def test_the_checks_see_an_upward_import(tmp_path, monkeypatch):
    """The walk is not vacuous: an import of a later stage from the engine is caught."""
    fake = tmp_path / "logps.py"
    fake.write_text("def f():\n    from prefsift.pipeline import run_pipeline\n")
    monkeypatch.setitem(MODULES, "prefsift.engine.fake", fake)
    assert "prefsift.pipeline" in imports("prefsift.engine.fake")
    assert LEVEL[unit("prefsift.pipeline")] >= LEVEL[unit("prefsift.engine.fake")]


def test_the_entry_points_reach_the_api_only_inside_a_function():
    """The exception above is the lazy one it claims: the package's module-level code imports nothing of prefsift's
    but the errors, and `import prefsift` loads no stage."""
    import subprocess
    import sys

    tree = ast.parse(MODULES["prefsift"].read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module.startswith("prefsift")} == {
        "prefsift.errors"}
    loaded = subprocess.run([sys.executable, "-c", "import sys, prefsift; print(sorted(m for m in sys.modules "
                             "if m.startswith('prefsift')))"], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['prefsift', 'prefsift.errors']"
