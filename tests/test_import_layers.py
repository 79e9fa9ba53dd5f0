"""The packages stack in layers, and nothing imports upward: no import circle between them.

models (the families moe-local defines itself: transformers-style modeling files that import
nothing else of moe-local) < quant (numerics) < experts (stores, the experts module) < lean (the
decode step without transformers' dispatch) < format (readers of files on disk) < loading (open a
checkpoint, load) < convert (quantize, calibrate, export, stage). Every import counts, at module
level or inside a function, except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import moe_local

ROOT = Path(os.environ.get("MOE_LOCAL_IMPORT_ROOT") or Path(moe_local.__file__).parent)
LAYERS = ("models", "quant", "experts", "lean", "format", "loading", "convert")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ``moe_local...`` module ``path`` imports at run time.

    ``from pkg import submodule`` counts as importing the submodule only.
    """
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_local"):
            subs = {f"{node.module}.{a.name}" for a in node.names}
            out.update(subs & modules)
            if subs - modules:  # names defined in the module itself
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("moe_local"))
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    names = set(modules)
    return {
        name: {m for m in _imports(path, names) if m in names and m != name} for name, path in modules.items()
    }


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else None


def test_no_package_imports_a_higher_layer():
    upward = []
    for module, deps in _graph().items():
        here = _package(module)
        for dep in deps:
            there = _package(dep)
            if here and there and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*trail[trail.index(d) :], d]
            if d not in state and (found := visit(d, [*trail, d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycle_inside_a_package():
    graph = _graph()
    for package in LAYERS:
        inside = {
            m: {d for d in deps if _package(d) == package}
            for m, deps in graph.items()
            if _package(m) == package
        }
        cycle = _find_cycle(inside)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)
