"""The package's import structure: runtime knows no model, models know no spec, no package cycles.

Read with `ast` (nothing imported), counting every import, also those inside functions, so a
cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).parents[1] / "cosmos_train"


def _unit(module: str) -> str:
    """cosmos_train.runtime.fsdp -> runtime; cosmos_train.spec -> spec (top-level modules are units)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _imports() -> dict[str, set[str]]:
    """module name -> the cosmos_train modules it imports."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        out[name] = {m for m in found if m.startswith("cosmos_train.")}
    return out


def test_runtime_imports_no_model_and_models_no_spec():
    imports = _imports()
    bad = [(m, i) for m, deps in imports.items() for i in deps
           if (_unit(m) == "runtime" and _unit(i) == "models") or (_unit(m) == "models" and _unit(i) == "spec")]
    assert bad == []


def _cyclic_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one node (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


# The run directory's on-disk layout (cosmos_train/layout.py) sits below both checkpoint/ and
# export/, so checkpoint -> export is the only edge between them.
KNOWN_PACKAGE_CYCLES: list[set[str]] = []


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, deps in _imports().items():
        graph[_unit(module)] |= {_unit(d) for d in deps if _unit(d) != _unit(module)}
    assert {"spec", "runtime", "models"} <= graph["train"]  # the graph is read at all
    assert _cyclic_groups(graph) == KNOWN_PACKAGE_CYCLES
