"""The import graph of the installed packages, read with ``ast``: no module imports its own
package's ``__init__`` for a name, and no cycle exists between modules, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder (pyproject's package-dir)
PACKAGES = {
    "potstill": ROOT / "compiler",
    "potstill.passes": ROOT / "passes",
    "potstill.targets": ROOT / "targets",
    "potstill.profiles": ROOT / "profiles",
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            # a sub-folder mapped to its own package wins over the parent's walk
            if name not in found or str(path).startswith(str(PACKAGES.get(name.rsplit(".", 1)[0], folder))):
                found.setdefault(name, path)
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every import in the file, lazy ones too."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    out: list[tuple[str, int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, []) for a in node.names if a.name.startswith("potstill"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("potstill"):
                out.append((target, node.lineno, [a.name for a in node.names]))
    return out


def _graph() -> tuple[nx.DiGraph, list[str]]:
    modules = _modules()
    graph = nx.DiGraph()
    own_init: list[str] = []
    for name, path in modules.items():
        graph.add_node(name)
        for target, line, names in _imports(name, path, modules):
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if submodules:
                graph.add_edges_from((name, s) for s in submodules)
            taken = [n for n in names if f"{target}.{n}" not in modules]
            if taken and target in modules and _is_package(modules[target]):
                if name.startswith(target + ".") and name != target:
                    own_init.append(f"{path.relative_to(ROOT)}:{line} takes {taken} from its package {target}")
                graph.add_edge(name, target)
            elif (not names and target in modules) or (taken and target in modules):
                graph.add_edge(name, target)
    return graph, own_init


def test_the_walk_sees_the_packages() -> None:
    modules = _modules()
    for expected in ("potstill.cli", "potstill.ir.capture", "potstill.inputs.teacher", "potstill.outputs.manifest",
                     "potstill.passes.prune.width", "potstill.targets.onnxruntime", "potstill.profiles.schema"):
        assert expected in modules
    graph, _ = _graph()
    assert graph.has_edge("potstill.driver", "potstill.plan")


def test_no_module_imports_its_own_package_init() -> None:
    _, own_init = _graph()
    assert own_init == []


def test_no_import_cycles_lazy_imports_included() -> None:
    graph, _ = _graph()
    # a package's __init__ that only documents (no imports) is not a node that closes a loop
    cycles = [c for c in nx.simple_cycles(graph) if len(c) > 1]
    shortest = sorted(cycles, key=len)[:10]
    assert shortest == [], "\n".join(" -> ".join([*c, c[0]]) for c in shortest)
